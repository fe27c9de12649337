"""Schema migrations: the database records the version of its layout, and ``users-grpc migrate``
brings it forward one step at a time.

Versions:

0. As written before versions existed: usernames and emails unique through unique indexes
   on ``users.username_key`` and ``users.email_key``.
1. Every user's names are claimed in ``claims`` (see :class:`users_grpc.adapters.mongo.claims.MongoClaims`).
   Servers of this version claim names at every version; the unique indexes stay, so a
   replica of an older version, which claims nothing, still cannot write a duplicate. Safe to
   apply while such replicas run.
2. The unique indexes give way to plain ones: claims alone keep names unique, and ``users``
   can be sharded by ``_id``. Only once no replica older than version 1 runs, since those rely
   on the indexes: ``migrate`` applies it when told so (``--all-replicas-upgraded``).

Each step is idempotent, and the long one records its progress in the ``schema`` document as it
goes, so a run that dies resumes where it stopped. A new, empty database starts at the latest
version. ``serve`` refuses a database newer than it knows.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from users_grpc.adapters.mongo.schema import MongoSchema
from users_grpc.domain.errors import ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# From this version every user's names are claimed, so lookups by name may go through claims.
CLAIMS_COMPLETE = 2
BACKFILL_BATCH = 500


@dataclass(frozen=True)
class Step:
    version: int  # the version the database holds once the step is done
    summary: str
    needs_all_replicas_upgraded: bool
    apply: Callable[[MongoSchema, datetime], Awaitable[None]]


async def claim_existing_names(schema: MongoSchema, now: datetime) -> None:
    state = await schema.state() or {}
    after = (state.get("progress") or {}).get("claimed_after")
    while True:
        after, conflicts = await schema.claims.backfill(after, BACKFILL_BATCH, now)
        if conflicts:
            # Unique indexes made this impossible; say what, and change nothing further.
            raise ConfigError("names claimed twice, fix these users first: " + "; ".join(conflicts))
        if after is None:
            return
        await schema.record(0, progress={"claimed_after": after})


async def drop_unique_indexes(schema: MongoSchema, now: datetime) -> None:
    # Users written by older replicas since step 1 get their claims first.
    await claim_existing_names(schema, now)
    await schema.drop_unique_identifier_indexes()
    await schema.ensure_identifier_indexes(unique=False)


STEPS = (
    Step(1, "claim every user's username and email in the claims collection", False, claim_existing_names),
    Step(2, "replace the unique username and email indexes with plain ones", True, drop_unique_indexes),
)


async def current_version(schema: MongoSchema) -> int:
    state = await schema.state()
    return int(state["version"]) if state else 0


async def prepare(schema: MongoSchema) -> int:
    """At start-up: the database's version, after making a new database the latest one.

    Raises :class:`ConfigError` for a database newer than this server, which could hold data
    this code would misread or write in a way a newer replica does not expect.
    """
    state = await schema.state()
    if state is None and not await schema.has_users():
        await schema.drop_unique_identifier_indexes()
        await schema.ensure_identifier_indexes(unique=False)
        await schema.record(SCHEMA_VERSION)
        return SCHEMA_VERSION
    version = int(state["version"]) if state else 0
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the database holds schema version {version}, newer than this server's {SCHEMA_VERSION}:"
            " run the newer users-grpc that migrated it"
        )
    await schema.ensure_identifier_indexes(unique=version < 2)
    if version < SCHEMA_VERSION:
        log.warning(
            "database schema is behind; run `users-grpc migrate`",
            extra={"version": version, "latest": SCHEMA_VERSION},
        )
    return version


async def migrate(
    schema: MongoSchema, now: datetime, *, dry_run: bool, all_replicas_upgraded: bool, say: Callable[[str], None]
) -> int:
    """Apply the steps the database lacks, in order; the version it holds afterwards."""
    version = await current_version(schema)
    if version > SCHEMA_VERSION:
        raise ConfigError(f"the database holds schema version {version}, newer than this users-grpc knows")
    for step in STEPS:
        if step.version <= version:
            continue
        if step.needs_all_replicas_upgraded and not all_replicas_upgraded:
            say(
                f"stopping before step {step.version} ({step.summary}): it needs every replica to run"
                " this version or newer; once they do, run again with --all-replicas-upgraded"
            )
            break
        if dry_run:
            say(f"would apply step {step.version}: {step.summary}")
            continue
        say(f"applying step {step.version}: {step.summary}")
        await step.apply(schema, now)
        await schema.record(step.version)
        version = step.version
    say(f"schema version {version} (latest {SCHEMA_VERSION})")
    return version
