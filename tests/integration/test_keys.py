"""The service's keys against the real database: signing keys kept sealed and retired once,
resealed only from what was read, and key material added once and read by its name."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.support.records import NOW
from tests.support.stores import Stores
from users_grpc.domain.model import StoredKey

SECOND = timedelta(seconds=1)
DAY = timedelta(days=1)


async def test_signing_keys_are_retired_once_and_resealed_only_from_what_was_read(stores: Stores) -> None:
    keys = stores.keys
    retired = StoredKey(kid="old", sealed_private_key=b"o", created_at=NOW - DAY, retired_at=NOW)
    first = StoredKey(kid="k1", sealed_private_key=b"a", created_at=NOW)
    second = StoredKey(kid="k2", sealed_private_key=b"a", created_at=NOW)
    for key in (retired, first, second):
        await keys.add(key)
    assert sorted(await keys.all(), key=lambda key: key.kid) == [first, second, retired]
    assert not await keys.reseal("k2", b"stale", b"b")
    assert await keys.reseal("k2", b"a", b"b")
    assert not await keys.retire("old", NOW + DAY)
    assert await keys.retire("k1", NOW + SECOND)
    assert not await keys.retire("k1", NOW + DAY)
    assert sorted(await keys.all(), key=lambda key: key.kid) == [
        StoredKey(kid="k1", sealed_private_key=b"a", created_at=NOW, retired_at=NOW + SECOND),
        StoredKey(kid="k2", sealed_private_key=b"b", created_at=NOW),
        retired,
    ]


async def test_key_material_is_read_by_its_name(stores: Stores) -> None:
    material = stores.key_material
    assert await material.add("first", b"1")
    assert await material.add("second", b"2")
    assert [await material.get("second"), await material.get("first"), await material.get("third")] == [
        b"2",
        b"1",
        None,
    ]


async def test_key_material_is_listed_by_name_prefix_with_its_time_of_use(stores: Stores) -> None:
    material = stores.key_material
    since = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert await material.add("digest-root", b"0")
    assert await material.add_in_use_from("digest-root/1", b"1", since)
    assert not await material.add_in_use_from("digest-root/1", b"other", since + timedelta(days=1))
    assert await material.add("digest-rooted", b"x")  # the prefix is literal: no pattern in it
    assert await material.add("digest-rootXed", b"y")
    assert await material.add("other", b"z")
    listed = sorted(await material.named_with_prefix("digest-root/"))
    assert listed == [("digest-root/1", b"1", since)]
    everything = sorted(await material.named_with_prefix("digest-root"))
    assert [(name, sealed) for name, sealed, _ in everything] == [
        ("digest-root", b"0"),
        ("digest-root/1", b"1"),
        ("digest-rootXed", b"y"),
        ("digest-rooted", b"x"),
    ]
    assert [since for _, _, since in everything] == [None, since, None, None]
    assert await material.named_with_prefix("digest.root") == []  # a dot is a dot, not any character


async def test_key_material_is_added_once_and_resealed_only_from_what_was_read(stores: Stores) -> None:
    material = stores.key_material
    assert await material.get("root") is None
    assert await material.add("root", b"sealed")
    assert not await material.add("root", b"another replica's")
    assert await material.get("root") == b"sealed"
    assert not await material.reseal("root", b"stale", b"new")
    assert await material.reseal("root", b"sealed", b"new")
    assert await material.get("root") == b"new"
    assert await stores.database["key_material"].count_documents({}) == 1
    assert await stores.keys.reseal("k", b"a", b"b") is False


async def test_the_key_store_keeps_sealed_keys_and_retires_each_once(stores: Stores) -> None:
    await stores.keys.add(StoredKey(kid="k1", sealed_private_key=b"\x00sealed", created_at=NOW))
    await stores.keys.add(StoredKey(kid="k2", sealed_private_key=b"other", created_at=NOW + timedelta(hours=1)))
    keys = {k.kid: k for k in await stores.keys.all()}
    assert keys["k1"] == StoredKey(kid="k1", sealed_private_key=b"\x00sealed", created_at=NOW)
    assert await stores.keys.retire("k1", NOW) is True
    assert await stores.keys.retire("k1", NOW) is False
    assert await stores.keys.retire("nope", NOW) is False
    keys = {k.kid: k for k in await stores.keys.all()}
    assert keys["k1"].retired_at == NOW
    assert keys["k2"].retired_at is None
    # Where earlier releases keep them, so that an upgraded replica signs with the same keys.
    assert await stores.database["signing_keys"].count_documents({}) == 2
