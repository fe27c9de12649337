"""The outbox against the real database: which mail a sender claims first and what a claim, a
retry and a postponement store; one sender at a time per lease, and giving up; what the metrics
count; bodies that do not open, and bodies resealed under a new key while other replicas reseal or
deliver the same mail; mail stored by earlier releases (sealed under the old associated data,
queued before bodies were sealed, a notice queued before the outbox named its user)."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta

import bson
from bson import ObjectId
from pymongo import MongoClient

from tests.support.records import NOW, new_user
from tests.support.stores import Stores
from users_grpc.adapters.mongo.documents import Document
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.domain.model import Mail

NOTICE = Mail(to="jane@example.com", subject="s", body="b")


SECOND = timedelta(seconds=1)


async def raw(stores: Stores, to: str) -> Document:
    document = await stores.database["outbox"].find_one({"to": to})
    assert document is not None
    return document


async def test_the_mail_due_first_is_claimed_first_and_marked_sending_for_its_lease(stores: Stores) -> None:
    outbox = stores.outbox
    # Queued in the other order than they fall due: the claim goes by due time, not by insertion.
    await outbox.enqueue(Mail(to="later@x.io", subject="s", body="b"), NOW + SECOND)
    await outbox.enqueue(Mail(to="sooner@x.io", subject="s", body="b"), NOW)
    first = await outbox.claim(NOW + SECOND, 60)
    assert first is not None
    assert (first.mail.to, first.attempts) == ("sooner@x.io", 1)
    claimed = await raw(stores, "sooner@x.io")
    assert (claimed["status"], claimed["attempts"], claimed["next_attempt_at"]) == (
        "sending",
        1,
        NOW + SECOND + timedelta(seconds=60),
    )
    second = await outbox.claim(NOW + SECOND, 60)
    assert second is not None
    assert second.mail.to == "later@x.io"
    assert await outbox.claim(NOW + SECOND, 60) is None


async def test_a_retry_and_a_postponement_make_the_mail_pending_again_and_a_retry_keeps_its_error(
    stores: Stores,
) -> None:
    outbox = stores.outbox
    await outbox.enqueue(Mail(to="retry@x.io", subject="s", body="b"), NOW)
    await outbox.enqueue(Mail(to="postpone@x.io", subject="s", body="b"), NOW)
    claimed = {mail.mail.to: mail for mail in [await outbox.claim(NOW, 60), await outbox.claim(NOW, 60)] if mail}
    retried, postponed = claimed["retry@x.io"], claimed["postpone@x.io"]
    await outbox.retry_later(retried.id, NOW + 5 * SECOND, "421 busy")
    await outbox.postpone(postponed.id, NOW + 7 * SECOND)
    stored = await raw(stores, "retry@x.io")
    assert (stored["status"], stored["next_attempt_at"], stored["last_error"], stored["attempts"]) == (
        "pending",
        NOW + 5 * SECOND,
        "421 busy",
        1,
    )
    stored = await raw(stores, "postpone@x.io")
    # The attempt the claim counted was never made.
    assert (stored["status"], stored["next_attempt_at"], stored["attempts"]) == ("pending", NOW + 7 * SECOND, 0)
    assert "last_error" not in stored


async def test_a_mail_whose_body_does_not_open_is_failed_as_of_the_claim(stores: Stores) -> None:
    await MongoOutbox(stores.database, SecretsAtRest(os.urandom(32))).enqueue(
        Mail(to="other-key@x.io", subject="s", body="b"), NOW
    )
    assert await stores.outbox.claim(NOW + 3 * SECOND, 60) is None
    failed = await raw(stores, "other-key@x.io")
    assert (failed["status"], failed["failed_at"]) == ("failed", NOW + 3 * SECOND)


async def test_the_metrics_count_pending_and_sending_mail_as_waiting_and_date_the_oldest_waiting_one(
    stores: Stores,
) -> None:
    outbox = stores.outbox
    assert await outbox.counts() == (0, 0, None)
    # Queued out of creation order, so the oldest is not the first stored.
    await outbox.enqueue(Mail(to="b@x.io", subject="s", body="b"), NOW + 2 * SECOND)
    await outbox.enqueue(Mail(to="failed@x.io", subject="s", body="b"), NOW)
    await outbox.enqueue(Mail(to="a@x.io", subject="s", body="b"), NOW + SECOND)
    await outbox.enqueue(Mail(to="c@x.io", subject="s", body="b"), NOW + 3 * SECOND)
    await outbox.give_up(str((await raw(stores, "failed@x.io"))["_id"]), "550 no such user", NOW)
    assert await outbox.counts() == (3, 1, NOW + SECOND)
    sending = await outbox.claim(NOW + SECOND, 60)
    assert sending is not None
    assert sending.mail.to == "a@x.io"
    assert await outbox.counts() == (3, 1, NOW + SECOND)
    await outbox.delivered(sending.id)
    assert await outbox.counts() == (2, 1, NOW + 2 * SECOND)
    for to in ("b@x.io", "c@x.io"):
        await outbox.give_up(str((await raw(stores, to))["_id"]), "550 no such user", NOW)
    assert await outbox.counts() == (0, 3, None)


class MeddlingSecrets(SecretsAtRest):
    """Keys that, while resealing a mail's body, let another replica act on that mail first
    (through a client of its own): reseal it itself, or deliver (delete) it."""

    def __init__(self, key: bytes, old_key: bytes, uri: str, database_name: str) -> None:
        super().__init__(key, (old_key,))
        self.other_replica: MongoClient[Document] = MongoClient(uri)
        self.outbox = self.other_replica[database_name]["outbox"]
        self.seen: set[str] = set()

    def reseal_mail_body(self, sealed: bytes, associated_data: bytes) -> bytes | None:
        # The repository binds each body to its mail's id and recipient (its associated data, a
        # BSON document); a change of that layout fails this test loudly, at the lookups below.
        about = bson.decode(associated_data)
        first_time = about["to"] not in self.seen
        self.seen.add(about["to"])
        new = super().reseal_mail_body(sealed, associated_data)
        if first_time and about["to"] == "resealed-meanwhile@x.io":
            assert new is not None
            self.outbox.update_one({"_id": about["id"]}, {"$set": {"sealed_body": new}})
        elif first_time and about["to"] == "delivered-meanwhile@x.io":
            self.outbox.delete_one({"_id": about["id"]})
        return new


async def test_resealing_counts_each_body_once_though_other_replicas_reseal_or_deliver_it_meanwhile(
    stores: Stores, mongodb_uri: str, database_name: str
) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = MongoOutbox(stores.database, SecretsAtRest(old_key))
    for to in ("resealed-meanwhile@x.io", "delivered-meanwhile@x.io", "plain@x.io"):
        await before.enqueue(Mail(to=to, subject="s", body=f"body of {to}"), NOW)
    await MongoOutbox(stores.database, SecretsAtRest(new_key)).enqueue(
        Mail(to="current@x.io", subject="s", body="body of current@x.io"), NOW
    )
    for to in ("lost1@x.io", "lost2@x.io"):
        await MongoOutbox(stores.database, SecretsAtRest(os.urandom(32))).enqueue(
            Mail(to=to, subject="s", body="b"), NOW
        )
    # Queued before bodies were sealed (and not sealed yet): not the resealing's to touch.
    legacy = {"to": "legacy@x.io", "subject": "s", "body": "plain", "status": "pending", "next_attempt_at": NOW}
    await stores.database["outbox"].insert_one(legacy)
    secrets = MeddlingSecrets(new_key, old_key, mongodb_uri, database_name)
    try:
        assert await MongoOutbox(stores.database, secrets).reseal_bodies() == (1, 2, 2)
    finally:
        secrets.other_replica.close()
    assert secrets.seen == {
        "resealed-meanwhile@x.io",
        "delivered-meanwhile@x.io",
        "plain@x.io",
        "current@x.io",
        "lost1@x.io",
        "lost2@x.io",
    }
    only_new = MongoOutbox(stores.database, SecretsAtRest(new_key))
    opened = []
    while (mail := await only_new.claim(NOW, 60)) is not None:
        opened.append(mail.mail)
    assert sorted(mail.to for mail in opened) == [
        "current@x.io",
        "legacy@x.io",
        "plain@x.io",
        "resealed-meanwhile@x.io",
    ]
    assert all(mail.body == ("plain" if mail.to == "legacy@x.io" else f"body of {mail.to}") for mail in opened)
    assert await stores.database["outbox"].count_documents({"to": "delivered-meanwhile@x.io"}) == 0


async def test_legacy_mail_is_dated_as_failed_only_if_it_failed_undated(stores: Stores) -> None:
    legacy = {"subject": "s", "attempts": 1, "created_at": NOW, "next_attempt_at": NOW + SECOND}
    await stores.database["outbox"].insert_many(
        [
            {**legacy, "to": "pending@x.io", "body": "b", "status": "pending"},
            {**legacy, "to": "undated@x.io", "body": "b", "status": "failed"},
            {**legacy, "to": "dated@x.io", "body": "b", "status": "failed", "failed_at": NOW - SECOND},
        ]
    )
    assert await stores.outbox.seal_legacy_mail() == 3
    assert "failed_at" not in await raw(stores, "pending@x.io")
    assert (await raw(stores, "undated@x.io"))["failed_at"] == NOW + SECOND
    assert (await raw(stores, "dated@x.io"))["failed_at"] == NOW - SECOND


async def test_outbox_lease_hands_each_mail_to_one_sender_at_a_time(stores: Stores) -> None:
    await stores.outbox.enqueue(Mail(to="a@x.io", subject="s", body="b"), NOW)
    claims = await asyncio.gather(*(stores.outbox.claim(NOW, 60) for _ in range(5)))
    claimed = [claim for claim in claims if claim is not None]
    assert len(claimed) == 1
    assert claimed[0].mail == Mail(to="a@x.io", subject="s", body="b")
    assert claimed[0].attempts == 1
    # The sender died: after the lease another one takes the mail over.
    retaken = await stores.outbox.claim(NOW + timedelta(seconds=61), 60)
    assert retaken is not None
    assert (retaken.id, retaken.attempts) == (claimed[0].id, 2)
    await stores.outbox.delivered(retaken.id)
    assert await stores.outbox.claim(NOW + timedelta(days=1), 60) is None


async def test_outbox_retry_and_give_up(stores: Stores) -> None:
    await stores.outbox.enqueue(Mail(to="a@x.io", subject="s", body="b"), NOW)
    first = await stores.outbox.claim(NOW, 60)
    assert first is not None
    await stores.outbox.retry_later(first.id, NOW + timedelta(seconds=30), "refused")
    assert await stores.outbox.claim(NOW + timedelta(seconds=29), 60) is None
    second = await stores.outbox.claim(NOW + timedelta(seconds=30), 60)
    assert second is not None
    await stores.outbox.give_up(second.id, "refused", NOW + timedelta(seconds=30))
    assert await stores.outbox.claim(NOW + timedelta(days=365), 60) is None


async def test_a_mail_whose_body_does_not_open_is_given_up_and_others_still_go(stores: Stores) -> None:
    outbox = stores.outbox
    await outbox.enqueue(Mail(to="a@x.io", subject="first", body="b1"), NOW)
    await outbox.enqueue(Mail(to="b@x.io", subject="second", body="b2"), NOW + timedelta(seconds=1))
    first = await stores.database["outbox"].find_one({"subject": "first"})
    assert first is not None
    # Moved to another recipient: the body no longer opens.
    await stores.database["outbox"].update_one({"_id": first["_id"]}, {"$set": {"to": "evil@x.io"}})
    claimed = await outbox.claim(NOW + timedelta(seconds=1), 60)
    assert claimed is not None
    assert claimed.mail == Mail(to="b@x.io", subject="second", body="b2")
    assert await outbox.counts() == (1, 1, NOW + timedelta(seconds=1))
    given_up = await stores.database["outbox"].find_one({"_id": first["_id"]})
    assert given_up is not None
    assert (given_up["status"], given_up["last_error"]) == ("failed", "the sealed body does not open")


async def test_bodies_are_resealed_under_the_new_key_and_mail_of_no_key_is_counted(stores: Stores) -> None:
    old_key, new_key = os.urandom(32), os.urandom(32)
    before = MongoOutbox(stores.database, SecretsAtRest(old_key))
    await before.enqueue(Mail(to="a@x.io", subject="s", body="b1"), NOW)
    await before.enqueue(Mail(to="b@x.io", subject="s", body="b2"), NOW)
    await MongoOutbox(stores.database, SecretsAtRest(os.urandom(32))).enqueue(
        Mail(to="c@x.io", subject="s", body="b3"), NOW
    )
    after = MongoOutbox(stores.database, SecretsAtRest(new_key, (old_key,)))
    assert await after.reseal_bodies() == (2, 0, 1)
    assert await after.reseal_bodies() == (0, 2, 1)
    only_new = MongoOutbox(stores.database, SecretsAtRest(new_key))
    bodies = set()
    for _ in range(2):
        mail = await only_new.claim(NOW, 60)
        assert mail is not None
        bodies.add(mail.mail.body)
    assert bodies == {"b1", "b2"}


async def test_a_notice_queued_before_the_outbox_named_its_user_is_traced_to_the_user_holding_it(
    stores: Stores,
) -> None:
    users, outbox = stores.users, stores.outbox
    user = await users.add(new_user())
    assert await users.set_password(user.id, "$2b$10$new", NOW, NOTICE)
    pending = await users.claim_pending_notices(NOW, 60)
    assert pending is not None
    [notice] = pending.notices
    await outbox.enqueue(notice.mail, NOW, mail_id=notice.id, notice_of=user.id)
    await outbox.enqueue(Mail(to="a@x.io", subject="s", body="b"), NOW + timedelta(seconds=1))
    await stores.database["outbox"].update_one({"_id": ObjectId(notice.id)}, {"$unset": {"notice_of": ""}})
    first = await outbox.claim(NOW + timedelta(seconds=1), 60)
    assert first is not None
    assert (first.id, first.notice_of) == (notice.id, user.id)
    second = await outbox.claim(NOW + timedelta(seconds=1), 60)
    assert second is not None
    assert second.notice_of is None  # queued as no notice
    await users.release_notices(pending)
    await outbox.retry_later(first.id, NOW, "again")
    again = await outbox.claim(NOW + timedelta(seconds=2), 60)
    assert again is not None
    assert (again.id, again.notice_of) == (notice.id, None)  # no user holds it any more


async def test_mail_sealed_or_queued_by_earlier_releases_still_goes_out(stores: Stores) -> None:
    """The stored format: a body sealed under the associated data as spelt when it was queued (its
    id, recipient and subject), and mail queued before bodies were sealed, both open."""
    secrets = stores.secrets
    sealed_id = ObjectId()
    associated = bson.encode({"purpose": "outbox-mail", "id": sealed_id, "to": "a@x.io", "subject": "s"})
    mail: Document = {"subject": "s", "status": "pending", "attempts": 0, "created_at": NOW, "notice_of": None}
    sealed = secrets.seal_mail_body("b1", associated)
    await stores.database["outbox"].insert_many(
        [
            {**mail, "_id": sealed_id, "to": "a@x.io", "next_attempt_at": NOW, "sealed_body": sealed},
            {**mail, "to": "b@x.io", "next_attempt_at": NOW + timedelta(seconds=1), "body": "b2"},
        ]
    )
    first = await stores.outbox.claim(NOW + timedelta(seconds=1), 60)
    second = await stores.outbox.claim(NOW + timedelta(seconds=1), 60)
    assert first is not None
    assert second is not None
    assert [first.mail, second.mail] == [
        Mail(to="a@x.io", subject="s", body="b1"),
        Mail(to="b@x.io", subject="s", body="b2"),
    ]


async def test_a_mail_with_an_html_part_keeps_both_parts_sealed(stores: Stores) -> None:
    """Both parts in the one sealed body (so sealing and re-sealing stay as they were); a text-only
    mail is stored as before this change, which earlier releases read."""
    templated = Mail(to="html@x.io", subject="s", body="code 123456", html="<p>code 123456</p>")
    await stores.outbox.enqueue(templated, NOW)
    await stores.outbox.enqueue(Mail(to="text@x.io", subject="s", body="plain"), NOW + SECOND)
    stored = await raw(stores, "html@x.io")
    assert b"123456" not in bytes(stored["sealed_body"])
    text_only = await raw(stores, "text@x.io")
    associated = bson.encode({"purpose": "outbox-mail", "id": text_only["_id"], "to": "text@x.io", "subject": "s"})
    assert stores.secrets.open_mail_body(bytes(text_only["sealed_body"]), associated) == "plain"
    first = await stores.outbox.claim(NOW + SECOND, 60)
    second = await stores.outbox.claim(NOW + SECOND, 60)
    assert first is not None
    assert second is not None
    assert [first.mail, second.mail] == [templated, Mail(to="text@x.io", subject="s", body="plain")]
