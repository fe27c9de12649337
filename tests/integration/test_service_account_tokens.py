"""Service-account tokens inside their account's document, against the real database: the cap
holds under racing creations (one conditional single-document update each), a revocation
removes the token and frees its place, and the account's deletion takes its tokens with it."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from tests.support.stores import Stores
from users_grpc.domain.model import ServiceAccount
from users_grpc.domain.service_account_tokens import MAX_TOKENS_PER_ACCOUNT, ServiceAccountToken

NOW = datetime(2026, 1, 1, 12, 0, 0, 123000, tzinfo=UTC)


def token(store_id: str, client_id: str) -> ServiceAccountToken:
    return ServiceAccountToken(
        id=store_id,
        service_account_id=client_id,
        display_name="idp",
        created_at=NOW,
        expires_at=None,
        last_used_at=None,
    )


async def test_the_cap_holds_under_racing_creations_and_revocation_frees_a_place(stores: Stores) -> None:
    accounts = stores.service_accounts
    client_id = accounts.new_id()
    await accounts.add(ServiceAccount(client_id=client_id, name="okta", created_at=NOW), "digest")
    ids = [accounts.new_id() for _ in range(MAX_TOKENS_PER_ACCOUNT + 5)]
    added = await asyncio.gather(
        *(accounts.add_token(token(id_, client_id), f"digest-{id_}", MAX_TOKENS_PER_ACCOUNT) for id_ in ids)
    )
    assert added.count(True) == MAX_TOKENS_PER_ACCOUNT
    stored = await accounts.tokens(client_id)
    assert stored is not None
    assert sorted(t.id for t in stored) == sorted(id_ for id_, ok in zip(ids, added, strict=True) if ok)

    first = stored[0].id
    holder = await accounts.token_holder(client_id, first)
    assert holder is not None
    assert (holder.account.name, holder.digest) == ("okta", f"digest-{first}")
    assert await accounts.revoke_token(client_id, first)
    assert not await accounts.revoke_token(client_id, first)
    revoked = await accounts.token_holder(client_id, first)
    assert revoked is not None
    assert (revoked.token, revoked.digest) == (None, None)
    assert await accounts.add_token(token(accounts.new_id(), client_id), "digest", MAX_TOKENS_PER_ACCOUNT)
    assert not await accounts.add_token(token(accounts.new_id(), client_id), "digest", MAX_TOKENS_PER_ACCOUNT)

    # The account's own reads leave its tokens out; its deletion takes them along.
    assert await accounts.get(client_id) == ServiceAccount(client_id=client_id, name="okta", created_at=NOW)
    assert await accounts.delete(client_id)
    assert await accounts.token_holder(client_id, stored[1].id) is None
    assert await accounts.tokens(client_id) is None
    assert not await accounts.add_token(token(accounts.new_id(), client_id), "digest", MAX_TOKENS_PER_ACCOUNT)
