"""Rotating the key-encryption key: the digest root, and re-sealing what the old key sealed.

What the key-encryption key seals: the signing keys' private halves (``signing_keys``), TOTP
secrets (``users``, ``mfa.sealed_secret``), outbox mail bodies (``outbox``, under a key derived
from it) and the digest root (``key_material``). ``users-grpc keys rewrap`` re-seals each under
the current key while replicas keep serving: every document by a compare-and-set on the sealed
value it read, so a concurrent writer (a new MFA enrollment, say) is never overwritten, and a
second run, or one resumed after a failure, re-seals only what is left.

The keys of the stored code and token digests cannot be rotated that way: a digest cannot be
re-made without the secret it hides. They derive from versioned digest roots, stored sealed
(``key_material``: ``digest-root`` is version 0, the key-encryption key the database was first
set up with; ``digest-root/<n>`` are 256 random bits each). Rotating the key-encryption key
re-seals every root, and stored digests keep matching under theirs; ``users-grpc keys
rotate-digest-root`` (:func:`start_digest_root`) starts a new root, so that new digests owe
nothing to any key-encryption key, a leaked one included. A new root is used from its
``in_use_from``: by then every replica has loaded it (each loads the roots at start and every
``USERS_KEY_RELOAD_SECONDS``), so a digest made under it on one replica matches on all.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidTag

from users_grpc.adapters.mongo.keys import MongoKeyMaterial, MongoKeyStore
from users_grpc.adapters.mongo.outbox import MongoOutbox
from users_grpc.adapters.mongo.users import MongoUserRepository
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.domain.errors import ConfigError
from users_grpc.services.mfa import totp_context
from users_grpc.services.tokens import KeyEncryption

DIGEST_ROOT = "digest-root"
_PAGE = 500
_Swap = Callable[[bytes, bytes], Awaitable[bool]]
_Reread = Callable[[], Awaitable[bytes | None]]


async def load_digest_roots(
    material: MongoKeyMaterial, keys: MongoKeyStore, encryption: KeyEncryption, secrets: SecretsAtRest
) -> None:
    """Make ``secrets`` derive its digest keys from the database's digest roots, storing root 0
    first if this database has none yet. Run at start and again every key reload."""
    await _ensure_first_digest_root(material, keys, encryption)
    roots: dict[int, tuple[bytes, datetime | None]] = {}
    for name, sealed, in_use_from in await material.named_with_prefix(DIGEST_ROOT):
        version = _digest_root_version(name)
        if version is None:
            continue
        try:
            roots[version] = (encryption.open(sealed, name), in_use_from)
        except InvalidTag:
            what = "the digest root" + ("" if version == 0 else f" {version}")
            raise ConfigError(_NOT_OPENED.format(what=f"{what} (key_material)")) from None
    secrets.use_digest_roots(roots)


async def start_digest_root(material: MongoKeyMaterial, encryption: KeyEncryption, in_use_from: datetime) -> int:
    """Store a new random digest root, sealed under the current key-encryption key, for new
    digests from ``in_use_from`` on; its version. Older roots stay, for the digests made under them."""
    while True:
        versions = [_digest_root_version(name) for name, _, _ in await material.named_with_prefix(DIGEST_ROOT)]
        version = max((v for v in versions if v is not None), default=0) + 1
        name = _digest_root_name(version)
        if await material.add_in_use_from(name, encryption.seal(os.urandom(32), name), in_use_from):
            return version
        # Another operator started the same version at the same moment: take the next one.


def _digest_root_name(version: int) -> str:
    return DIGEST_ROOT if version == 0 else f"{DIGEST_ROOT}/{version}"


def _digest_root_version(name: str) -> int | None:
    if name == DIGEST_ROOT:
        return 0
    number = name.removeprefix(DIGEST_ROOT + "/")
    return int(number) if number != name and number.isascii() and number.isdigit() else None


async def _ensure_first_digest_root(material: MongoKeyMaterial, keys: MongoKeyStore, encryption: KeyEncryption) -> None:
    """Store root 0 unless the database has it.

    A database set up before the root was stored has its digests keyed by the key-encryption key
    of that time: the one that opens its oldest signing key (the current one on a new database).
    """
    sealed = await material.get(DIGEST_ROOT)
    if sealed is None:
        stored = sorted(await keys.all(), key=lambda key: key.created_at)
        first = encryption.opening_key(stored[0].sealed_private_key, stored[0].kid) if stored else None
        if stored and first is None:
            raise ConfigError(_NOT_OPENED.format(what="the signing keys"))
        await material.add(DIGEST_ROOT, encryption.seal(first or encryption.current_key, DIGEST_ROOT))


_NOT_OPENED = (
    "USERS_KEY_ENCRYPTION_KEY does not open {what} stored in the database, nor does any key in "
    "USERS_OLD_KEY_ENCRYPTION_KEYS: list the key this database was sealed with in USERS_OLD_KEY_ENCRYPTION_KEYS"
)


@dataclass
class Tally:
    resealed: int = 0
    current: int = 0
    unopenable: int = 0

    def __str__(self) -> str:
        text = f"{self.resealed} re-sealed, {self.current} already under the current key"
        return text + (f", {self.unopenable} opened by no key" if self.unopenable else "")


@dataclass
class RewrapReport:
    signing_keys: Tally
    totp_secrets: Tally
    outbox_mail: Tally
    digest_root: Tally

    @property
    def unopenable(self) -> int:
        return sum(t.unopenable for t in (self.signing_keys, self.totp_secrets, self.outbox_mail, self.digest_root))

    def __str__(self) -> str:
        return (
            f"signing keys: {self.signing_keys}\nTOTP secrets: {self.totp_secrets}\n"
            f"outbox mail: {self.outbox_mail}\ndigest root: {self.digest_root}"
        )


async def rewrap(
    *,
    encryption: KeyEncryption,
    keys: MongoKeyStore,
    users: MongoUserRepository,
    outbox: MongoOutbox,
    material: MongoKeyMaterial,
) -> RewrapReport:
    """Re-seal everything sealed under an old key-encryption key under the current one."""
    signing = Tally()
    for key in await keys.all():
        await _reseal(
            signing,
            key.sealed_private_key,
            key.kid,
            encryption,
            functools.partial(keys.reseal, key.kid),
            functools.partial(_current_signing_key, keys, key.kid),
        )

    totp = Tally()
    after: str | None = None
    while page := await users.sealed_totp_secrets(after, _PAGE):
        for user_id, sealed in page:
            if sealed:
                await _reseal(
                    totp,
                    sealed,
                    totp_context(user_id),
                    encryption,
                    functools.partial(users.reseal_totp_secret, user_id),
                    functools.partial(_current_totp_secret, users, user_id),
                )
        after = page[-1][0]

    mail = Tally(*await outbox.reseal_bodies())

    roots = Tally()
    for name, sealed_root, _ in await material.named_with_prefix(DIGEST_ROOT):
        if _digest_root_version(name) is not None:
            await _reseal(
                roots,
                sealed_root,
                name,
                encryption,
                functools.partial(material.reseal, name),
                functools.partial(material.get, name),
            )
    return RewrapReport(signing_keys=signing, totp_secrets=totp, outbox_mail=mail, digest_root=roots)


async def _reseal(
    tally: Tally,
    sealed: bytes,
    context: str,
    encryption: KeyEncryption,
    swap: _Swap,
    reread: _Reread,
) -> None:
    """Re-seal one value by compare-and-set; if it changed meanwhile, read it again and retry."""
    current: bytes | None = sealed
    while current is not None:
        try:
            resealed = encryption.reseal(current, context)
        except InvalidTag:
            tally.unopenable += 1
            return
        if resealed is None:
            tally.current += 1
            return
        if await swap(current, resealed):
            tally.resealed += 1
            return
        current = await reread()  # None: the document is gone (a user deleted, MFA turned off)


async def _current_signing_key(keys: MongoKeyStore, kid: str) -> bytes | None:
    return next((k.sealed_private_key for k in await keys.all() if k.kid == kid), None)


async def _current_totp_secret(users: MongoUserRepository, user_id: str) -> bytes | None:
    account = await users.get_account(user_id)
    return None if account is None or account.mfa is None else account.mfa.sealed_secret
