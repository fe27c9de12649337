"""The outbox against the real database: which mail a sender claims first and what a claim, a
retry and a postponement store; what the metrics count; how bodies are resealed under a new
key while other replicas reseal or deliver the same mail; and legacy mail sealed at start."""

from __future__ import annotations

import os
from datetime import timedelta

import bson
from pymongo import MongoClient

from tests.support.records import NOW
from tests.support.stores import Stores
from users_grpc.domain import Mail
from users_grpc.repository import Document, MongoOutbox
from users_grpc.secrets_at_rest import SecretsAtRest

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
