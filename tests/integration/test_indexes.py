"""The indexes the stores make, against the real database: exactly the data model's, and kept by a
second start-up."""

from __future__ import annotations

from tests.support.stores import Stores

# The indexes the stores make at start-up, each serving a query named where it is made (the
# identifier indexes are the schema's, tests/e2e/test_claims.py). A change here is a change of the
# data model, made deliberately. `sparse` is left out: FerretDB does not report it.
INDEXES: dict[str, dict[str, tuple[list[tuple[str, int]], bool]]] = {
    "audit_events": {
        "_id_": ([("_id", 1)], False),
        "actor_time_id": ([("actor.id", 1), ("time", -1), ("_id", -1)], False),
        "subject_time_id": ([("subject_id", 1), ("time", -1), ("_id", -1)], False),
        "time_id": ([("time", -1), ("_id", -1)], False),
        "type_time_id": ([("type", 1), ("time", -1), ("_id", -1)], False),
    },
    "claims": {"_id_": ([("_id", 1)], False), "pending_since": ([("pending_since", 1)], False)},
    "group_members": {
        "_id_": ([("_id", 1)], False),
        "group_id_user_id": ([("group_id", 1), ("user_id", 1)], False),
        "user_id_group_id_unique": ([("user_id", 1), ("group_id", 1)], True),
    },
    "groups": {
        "_id_": ([("_id", 1)], False),
        "deleting": ([("deleting", 1)], False),
        "name_key_unique": ([("name_key", 1)], True),
    },
    "outbox": {
        "_id_": ([("_id", 1)], False),
        "status_failed_at": ([("status", 1), ("failed_at", 1)], False),
        "status_next_attempt_at": ([("status", 1), ("next_attempt_at", 1)], False),
    },
    "passkey_ceremonies": {"_id_": ([("_id", 1)], False), "expires_at": ([("expires_at", 1)], False)},
    "service_accounts": {"_id_": ([("_id", 1)], False), "name_unique": ([("name", 1)], True)},
    "sessions": {
        "_id_": ([("_id", 1)], False),
        "expires_at": ([("expires_at", 1)], False),
        "revoked_at": ([("revoked_at", 1)], False),
        "user_id": ([("user_id", 1)], False),
    },
    "throttles": {
        "_id_": ([("_id", 1)], False),
        "account": ([("account", 1)], False),
        "expires_at": ([("expires_at", 1)], False),
    },
    "user_changes": {
        "_id_": ([("_id", 1)], False),
        "published_at": ([("published_at", 1)], False),
        "user_id_number_unique": ([("user_id", 1), ("number", 1)], True),
    },
    "users": {
        "_id_": ([("_id", 1)], False),
        "created_at_id": ([("created_at", 1), ("_id", 1)], False),
        "deleting": ([("deleting", 1)], False),
        "external_id": ([("external_id", 1)], False),
        "is_active_created_at": ([("is_active", 1), ("created_at", 1)], False),
        "metadata_sk_id": ([("metadata.sk", 1), ("_id", 1)], False),
        "metadata_skv_id": ([("metadata.skv", 1), ("_id", 1)], False),
        "pending_changes_since": ([("pending_changes_since", 1)], False),
        "pending_mail_id": ([("pending_mail.id", 1)], False),
        "pending_mail_since": ([("pending_mail_since", 1)], False),
        "role_id": ([("role", 1), ("_id", 1)], False),
        "role_is_active": ([("role", 1), ("is_active", 1)], False),
        "state_id": ([("state", 1), ("_id", 1)], False),
    },
}


async def indexes(stores: Stores) -> dict[str, dict[str, tuple[list[tuple[str, int]], bool]]]:
    found: dict[str, dict[str, tuple[list[tuple[str, int]], bool]]] = {}
    for collection in await stores.database.list_collection_names():
        information = await stores.database[collection].index_information()
        found[collection] = {
            name: ([(field, int(order)) for field, order in spec["key"]], spec.get("unique", False))
            for name, spec in information.items()
        }
    return found


async def test_the_stores_make_exactly_their_indexes_and_a_second_start_up_keeps_them(stores: Stores) -> None:
    before = await indexes(stores)
    await stores.ensure_indexes()
    after = await indexes(stores)
    assert before == INDEXES
    assert after == INDEXES
