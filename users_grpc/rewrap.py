"""Rotating the key-encryption key: the digest root, and re-sealing what the old key sealed.

What the key-encryption key seals: the signing keys' private halves (``signing_keys``), TOTP
secrets (``users``, ``mfa.sealed_secret``), outbox mail bodies (``outbox``, under a key derived
from it) and the digest root (``key_material``). ``users-grpc keys rewrap`` re-seals each under
the current key while replicas keep serving: every document by a compare-and-set on the sealed
value it read, so a concurrent writer (a new MFA enrollment, say) is never overwritten, and a
second run, or one resumed after a failure, re-seals only what is left.

The keys of the stored code and token digests cannot be rotated that way: a digest cannot be
re-made without the secret it hides. They derive from the digest root, which is the
key-encryption key the database was first set up with, stored sealed: rotating the
key-encryption key re-seals the root and every stored digest keeps matching.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from users_grpc.config import ConfigError
from users_grpc.mfa import totp_context
from users_grpc.mongo.keys import MongoKeyMaterial, MongoKeyStore
from users_grpc.mongo.outbox import MongoOutbox
from users_grpc.mongo.users import MongoUserRepository
from users_grpc.secrets_at_rest import SecretsAtRest
from users_grpc.tokens import KeyEncryption

DIGEST_ROOT = "digest-root"
_PAGE = 500
_Swap = Callable[[bytes, bytes], Awaitable[bool]]
_Reread = Callable[[], Awaitable[bytes | None]]


async def load_digest_root(
    material: MongoKeyMaterial, keys: MongoKeyStore, encryption: KeyEncryption, secrets: SecretsAtRest
) -> None:
    """Make ``secrets`` derive its digest keys from the database's digest root, storing the root
    first if this database has none yet.

    A database set up before the root was stored has its digests keyed by the key-encryption key
    of that time: the one that opens its oldest signing key (the current one on a new database).
    """
    sealed = await material.get(DIGEST_ROOT)
    if sealed is None:
        stored = sorted(await keys.all(), key=lambda key: key.created_at)
        first = encryption.opening_key(stored[0].sealed_private_key, stored[0].kid) if stored else None
        if stored and first is None:
            raise ConfigError(_NOT_OPENED.format(what="the signing keys"))
        sealed = encryption.seal(first or encryption.current_key, DIGEST_ROOT)
        if not await material.add(DIGEST_ROOT, sealed):
            sealed = await material.get(DIGEST_ROOT) or sealed
    try:
        root = encryption.open(sealed, DIGEST_ROOT)
    except InvalidTag:
        raise ConfigError(_NOT_OPENED.format(what="the digest root (key_material)")) from None
    secrets.use_digest_root(root)


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

    root = Tally()
    sealed_root = await material.get(DIGEST_ROOT)
    if sealed_root is not None:
        await _reseal(
            root,
            sealed_root,
            DIGEST_ROOT,
            encryption,
            functools.partial(material.reseal, DIGEST_ROOT),
            functools.partial(material.get, DIGEST_ROOT),
        )
    return RewrapReport(signing_keys=signing, totp_secrets=totp, outbox_mail=mail, digest_root=root)


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
