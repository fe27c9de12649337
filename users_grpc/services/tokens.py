"""Signing keys and access tokens: ES256 (ECDSA P-256) JWTs that other services verify from our JWKS.

ES256 rather than EdDSA: every JOSE library verifies it, and RFC 9864 deprecates
the "EdDSA" algorithm name that Ed25519 tokens would carry.

Keys live in the key store (the database), the private halves sealed with
AES-GCM under the configured key-encryption key, so every replica signs and
verifies with the same set. Rotation adds a key that signs from then on;
older keys keep verifying until they are retired.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import secrets
import time
import uuid
from collections import OrderedDict
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from users_grpc.domain import base64url
from users_grpc.domain.errors import ConfigError, Unauthenticated
from users_grpc.domain.model import AccessClaims, Role, StoredKey, User
from users_grpc.domain.ports import Clock, KeyStore
from users_grpc.domain.rules import is_id
from users_grpc.domain.service_account_tokens import looks_like_token

log = logging.getLogger(__name__)

ALGORITHM = "ES256"
ACCESS_TOKEN_TYPE = "at+jwt"  # noqa: S105 - a media type, not a secret. RFC 9068: never accepted in place of anything else
_REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "jti"]
# A service account's tokens name it so; a user's tokens name a user id, which never has a colon.
SERVICE_ACCOUNT_SUBJECT_PREFIX = "service-account:"
# A password-change token's audience is the users' audience with this suffix (never taken for a user's).
PASSWORD_CHANGE_AUDIENCE_SUFFIX = ":password-change"  # noqa: S105  # an audience, not a secret
# An unknown kid triggers a reload of the key store at most this often.
_RELOAD_ON_UNKNOWN_KID_SECONDS = 5.0
# Tokens whose signature was checked, kept so that a client's every call does not check it again
# (an ECDSA verification is most of an authenticated call's CPU). A few thousand active clients per
# replica; each entry is about 1 kB.
VERIFIED_CACHE_SIZE = 4096
# An ES256 signature is r || s, 32 bytes each (RFC 7518, 3.4); n is the order of the P-256 group.
_ES256_HALF = 32
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


class _Verified(NamedTuple):
    """A token that passed :meth:`AccessTokens._verified`, for as long as its key and expiry allow."""

    audience: str
    kid: str
    claims: dict[str, Any]
    issued_at: datetime
    expires_at: datetime


class KeyEncryption:
    """AES-256-GCM sealing under the key-encryption key; a context (the key id, say) is bound in
    as associated data.

    Seals always use the current key. ``old_keys`` (USERS_OLD_KEY_ENCRYPTION_KEYS) still open
    what was sealed before a rotation, until ``users-grpc keys rewrap`` has re-sealed it all.
    """

    def __init__(self, key: bytes, old_keys: tuple[bytes, ...] = ()) -> None:
        if any(len(k) != 32 for k in (key, *old_keys)):
            raise ValueError("the key-encryption key must be 32 bytes")
        self._keys = (key, *(k for k in old_keys if k != key))
        self._aeads = [AESGCM(k) for k in self._keys]

    @property
    def current_key(self) -> bytes:
        return self._keys[0]

    def seal(self, plaintext: bytes, context: str) -> bytes:
        nonce = os.urandom(12)
        return nonce + self._aeads[0].encrypt(nonce, plaintext, context.encode())

    def open(self, sealed: bytes, context: str) -> bytes:
        """The plaintext, under whichever key opens it; ``InvalidTag`` if none does."""
        return self._opened(sealed, context)[1]

    def opening_key(self, sealed: bytes, context: str) -> bytes | None:
        """The key (current or old) that opens ``sealed``; None if none does."""
        try:
            return self._keys[self._opened(sealed, context)[0]]
        except InvalidTag:
            return None

    def reseal(self, sealed: bytes, context: str) -> bytes | None:
        """``sealed`` sealed again under the current key; None if it already is.

        Raises ``InvalidTag`` if no key opens it."""
        index, plaintext = self._opened(sealed, context)
        return None if index == 0 else self.seal(plaintext, context)

    def _opened(self, sealed: bytes, context: str) -> tuple[int, bytes]:
        for index, aead in enumerate(self._aeads):
            try:
                return index, aead.decrypt(sealed[:12], sealed[12:], context.encode())
            except InvalidTag:
                continue
        raise InvalidTag()


def new_key_encryption_key() -> str:
    """A fresh key-encryption key, as USERS_KEY_ENCRYPTION_KEY wants it."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()


class AccessTokens:
    """Issues and verifies access tokens with the keys of the key store."""

    def __init__(
        self,
        *,
        store: KeyStore,
        encryption: KeyEncryption,
        clock: Clock,
        issuer: str,
        audience: str,
        lifetime: timedelta,
    ) -> None:
        self._store = store
        self._encryption = encryption
        self._clock = clock
        self._issuer = issuer
        self._audience = audience
        self._lifetime = lifetime
        self._signing: tuple[str, ec.EllipticCurvePrivateKey] | None = None
        self._signing_created_at: datetime | None = None
        self._verifying: dict[str, ec.EllipticCurvePublicKey] = {}
        self._last_reload = 0.0
        # Keyed by the token's SHA-256, so the cache holds no usable token. Only what the signature
        # and claims prove is cached: revocation (token version, account state) is checked by the
        # caller on every call, expiry and the key's retirement on every hit.
        self._verified_tokens: OrderedDict[bytes, _Verified] = OrderedDict()

    async def rotate(self) -> str:
        """Add a new signing key; return its kid."""
        kid = uuid.uuid4().hex
        private = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        await self._store.add(
            StoredKey(kid=kid, sealed_private_key=self._encryption.seal(private, kid), created_at=self._clock.now())
        )
        await self.reload()
        log.info("signing key added", extra={"kid": kid})
        return kid

    @property
    def _service_audience(self) -> str:
        return f"{self._audience}:service-accounts"

    @property
    def _password_change_audience(self) -> str:
        return self._audience + PASSWORD_CHANGE_AUDIENCE_SUFFIX

    @property
    def signing_key_created_at(self) -> datetime | None:
        """When the key that signs now was made (its age is a metric)."""
        return self._signing_created_at

    @property
    def signing_kid(self) -> str | None:
        return None if self._signing is None else self._signing[0]

    async def retire(self, kid: str) -> bool:
        """Stop trusting a key; False if there is no live key of that id."""
        retired = await self._store.retire(kid, self._clock.now())
        await self.reload()
        return retired

    async def reload(self) -> None:
        """Read the key store: the newest live key signs, every live key verifies."""
        keys = sorted((k for k in await self._store.all() if k.retired_at is None), key=lambda k: k.created_at)
        verifying: dict[str, ec.EllipticCurvePublicKey] = {}
        signing: tuple[str, ec.EllipticCurvePrivateKey] | None = None
        signing_created_at: datetime | None = None
        for key in keys:
            try:
                opened = self._encryption.open(key.sealed_private_key, key.kid)
            except InvalidTag:
                raise ConfigError(
                    "USERS_KEY_ENCRYPTION_KEY does not open the signing keys stored in the database, "
                    "nor does any key in USERS_OLD_KEY_ENCRYPTION_KEYS: it is not the key they were sealed "
                    "with; use the key this database was set up with (or, mid-rotation, list that one as old)"
                ) from None
            private = serialization.load_der_private_key(opened, None)
            assert isinstance(private, ec.EllipticCurvePrivateKey)
            verifying[key.kid] = private.public_key()
            signing, signing_created_at = (key.kid, private), key.created_at
        self._signing, self._verifying = signing, verifying
        self._signing_created_at = signing_created_at
        self._last_reload = time.monotonic()

    async def ensure_signing_key(self) -> None:
        """Load the keys, and make the first one if the store has none."""
        await self.reload()
        if self._signing is None:
            await self.rotate()

    def issue(self, user: User, session_id: str, groups: tuple[str, ...] = ()) -> tuple[str, datetime]:
        claims: dict[str, object] = {"role": user.role.value, "ver": user.token_version, "sid": session_id}
        if groups:
            # Only when there are some: most tokens stay as small as before.
            claims["groups"] = list(groups)
        return self._sign(user.id, self._audience, claims)

    def issue_service(self, client_id: str) -> tuple[str, datetime]:
        """A token for a service account: ``sub`` is ``service-account:<client id>`` and it has no
        role, version or session, so :meth:`verify` never takes it for a user's token.

        Another audience than users' tokens: a service that verifies user tokens locally (pinning
        iss and aud, as docs/clients.md says) never takes a service account's token for a user's.
        """
        return self._sign(SERVICE_ACCOUNT_SUBJECT_PREFIX + client_id, self._service_audience, {})

    def issue_password_change(self, user: User, lifetime: timedelta) -> tuple[str, datetime]:
        """A token that allows ChangePassword only (grpc_api/access.py), for a user who must change
        their password before any session opens: no role, no session, and an audience of its own,
        so that neither ValidateToken nor a service verifying users' tokens locally takes it for a
        user's. Its ``ver`` ends it with the change (which bumps the token version)."""
        return self._sign(user.id, self._password_change_audience, {"ver": user.token_version}, lifetime)

    async def verify_password_change(self, token: str) -> tuple[str, int]:
        """The user id and token version of a valid password-change token of ours; Unauthenticated otherwise."""
        claims, _, _ = await self._verified(token, self._password_change_audience)
        version = claims.get("ver")
        if not isinstance(version, int) or not is_id(claims["sub"]) or {"role", "sid"} & claims.keys():
            raise Unauthenticated("invalid access token")
        return claims["sub"], version

    def _sign(
        self, subject: str, audience: str, extra: dict[str, object], lifetime: timedelta | None = None
    ) -> tuple[str, datetime]:
        if self._signing is None:
            raise RuntimeError("no signing key loaded")
        kid, private = self._signing
        now = self._clock.now()
        # JWT times are whole seconds; the reply states the expiry the token carries.
        expires_at = datetime.fromtimestamp(int((now + (lifetime or self._lifetime)).timestamp()), now.tzinfo)
        claims = {
            "iss": self._issuer,
            "aud": audience,
            "sub": subject,
            "iat": int(now.timestamp()),
            "exp": int(expires_at.timestamp()),
            "jti": uuid.uuid4().hex,
            **extra,
        }
        token = jwt.encode(claims, private, algorithm=ALGORITHM, headers={"kid": kid, "typ": ACCESS_TOKEN_TYPE})
        return _with_low_s(token), expires_at

    async def verify(self, token: str) -> AccessClaims:
        """The claims of a valid user access token of ours; :class:`Unauthenticated` for anything else."""
        claims, issued_at, expires_at = await self._verified(token, self._audience)
        try:
            role = Role(claims["role"])
            version = claims["ver"]
            session_id = claims["sid"]
        except (KeyError, ValueError):
            raise Unauthenticated("invalid access token") from None
        # A token signed by us but naming no possible user (a service account's, say) is refused
        # here, not passed on to lookups.
        if not isinstance(version, int) or not isinstance(session_id, str) or not is_id(claims["sub"]):
            raise Unauthenticated("invalid access token")
        groups = claims.get("groups", [])
        if not isinstance(groups, list) or not all(is_id(group) for group in groups):
            raise Unauthenticated("invalid access token")
        return AccessClaims(
            subject=claims["sub"],
            role=role,
            token_version=version,
            session_id=session_id,
            token_id=claims["jti"],
            issuer=claims["iss"],
            audience=self._audience,
            issued_at=issued_at,
            expires_at=expires_at,
            groups=tuple(groups),
        )

    async def verify_service(self, token: str) -> str:
        """The client id of a valid service-account token of ours; :class:`Unauthenticated` otherwise."""
        claims, _, _ = await self._verified(token, self._service_audience)
        subject = claims["sub"]
        client_id = subject.removeprefix(SERVICE_ACCOUNT_SUBJECT_PREFIX) if isinstance(subject, str) else ""
        if client_id == subject or not is_id(client_id) or {"role", "ver", "sid"} & claims.keys():
            raise Unauthenticated("invalid access token")
        return client_id

    async def _verified(self, token: str, audience: str) -> tuple[dict[str, Any], datetime, datetime]:
        """The claims of a token signed by one of our keys, unexpired, for ``audience``."""
        cache_key = hashlib.sha256(token.encode()).digest()
        hit = self._verified_tokens.get(cache_key)
        if hit is not None and hit.audience == audience and hit.kid in self._verifying:
            if hit.expires_at <= self._clock.now():
                del self._verified_tokens[cache_key]
                raise Unauthenticated("access token expired")
            self._verified_tokens.move_to_end(cache_key)
            return hit.claims, hit.issued_at, hit.expires_at
        claims, issued_at, expires_at, kid = await self._check_signature(token, audience)
        self._verified_tokens[cache_key] = _Verified(audience, kid, claims, issued_at, expires_at)
        if len(self._verified_tokens) > VERIFIED_CACHE_SIZE:
            self._verified_tokens.popitem(last=False)
        return claims, issued_at, expires_at

    async def _check_signature(self, token: str, audience: str) -> tuple[dict[str, Any], datetime, datetime, str]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise Unauthenticated("malformed access token") from None
        # Only our own keys, chosen by kid: jku, x5u and jwk headers are never followed.
        kid = header.get("kid")
        if header.get("typ") != ACCESS_TOKEN_TYPE or header.get("alg") != ALGORITHM or not isinstance(kid, str):
            raise Unauthenticated("not an access token")
        if kid not in self._verifying and time.monotonic() - self._last_reload > _RELOAD_ON_UNKNOWN_KID_SECONDS:
            try:
                await self.reload()
            except ConfigError as error:
                # Keys sealed under another key-encryption key: the token stays unverifiable, not a crash.
                log.error("could not open the signing keys", extra={"cause": str(error)})
        key = self._verifying.get(kid)
        if key is None:
            raise Unauthenticated("access token signed by an unknown key")
        if not _is_canonical_signature(token):
            raise Unauthenticated("invalid access token")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=[ALGORITHM],
                audience=audience,
                issuer=self._issuer,
                # Times are checked below against the service's clock, not PyJWT's wall clock.
                options={"require": _REQUIRED_CLAIMS, "verify_exp": False, "verify_iat": False, "verify_nbf": False},
            )
        except jwt.PyJWTError:
            raise Unauthenticated("invalid access token") from None
        now = self._clock.now()
        try:
            expires_at = datetime.fromtimestamp(claims["exp"], now.tzinfo)
            issued_at = datetime.fromtimestamp(claims["iat"], now.tzinfo)
        except (TypeError, ValueError, OverflowError):
            raise Unauthenticated("invalid access token") from None
        if expires_at <= now:
            raise Unauthenticated("access token expired")
        return claims, issued_at, expires_at, kid

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        """The public keys as an RFC 7517 key set."""
        keys = []
        for kid, key in self._verifying.items():
            numbers = key.public_numbers()
            keys.append(
                {
                    "kty": "EC",
                    "crv": "P-256",
                    "kid": kid,
                    "alg": ALGORITHM,
                    "use": "sig",
                    "x": base64url.encode(numbers.x.to_bytes(32, "big")),
                    "y": base64url.encode(numbers.y.to_bytes(32, "big")),
                }
            )
        return {"keys": keys}


def is_service_token(token: str) -> bool:
    """Whether ``token`` claims to be a service account's: only to choose how to verify it.

    Read without checking the signature; :meth:`AccessTokens.verify_service` then checks all,
    and :meth:`AccessTokens.verify` refuses such a token for a user's. A long-lived token
    (``usat_...``, services/service_account_tokens.py) is one too, by its prefix.
    """
    if looks_like_token(token):
        return True
    subject = _unverified_payload(token).get("sub")
    return isinstance(subject, str) and subject.startswith(SERVICE_ACCOUNT_SUBJECT_PREFIX)


def is_password_change_token(token: str) -> bool:
    """Whether ``token`` claims to be a password-change token: only to choose how to verify it
    (:meth:`AccessTokens.verify_password_change` checks all; :meth:`AccessTokens.verify` refuses it)."""
    audience = _unverified_payload(token).get("aud")
    return isinstance(audience, str) and audience.endswith(PASSWORD_CHANGE_AUDIENCE_SUFFIX)


def _unverified_payload(token: str) -> dict[str, Any]:
    # The payload read by hand: PyJWT's unverified decode costs as much again as the rest of
    # an authenticated call's own work, for what only picks a path.
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    try:
        payload = json.loads(base64url.decode(parts[1]))
    except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
        return {}
    return payload if isinstance(payload, dict) else {}


def _with_low_s(token: str) -> str:
    """The token with its ECDSA signature (r, s) made (r, n - s) if s is in the upper half.

    Both verify, and the signer gives either at random; only the low one is accepted
    (:func:`_is_canonical_signature`), so that a token has one spelling, not two.
    """
    signing_input, _, encoded = token.rpartition(".")
    signature = base64url.decode(encoded)
    s = int.from_bytes(signature[_ES256_HALF:], "big")
    if s <= _P256_ORDER // 2:
        return token
    low = (_P256_ORDER - s).to_bytes(_ES256_HALF, "big")
    return f"{signing_input}.{base64url.encode(signature[:_ES256_HALF] + low)}"


def _is_canonical_signature(token: str) -> bool:
    """Whether the signature is spelt the one way we sign: r || s of 32 bytes each with s at most
    n / 2, in base64url without padding and without stray low bits in its last character.

    ECDSA lets anyone turn a valid (r, s) into the valid (r, n - s), and base64url lets the same
    64 bytes be spelt sixteen ways (the last of 86 characters has 4 unused bits): a service that
    deny-lists a token by its text would miss the twin.
    """
    encoded = token.rpartition(".")[2]
    try:
        signature = base64url.decode(encoded)
    except ValueError:
        return False
    if len(signature) != 2 * _ES256_HALF or base64url.encode(signature) != encoded:
        return False
    return 0 < int.from_bytes(signature[_ES256_HALF:], "big") <= _P256_ORDER // 2
