"""Calling users.v1.UserService: local access-token verification and ErrorInfo reasons.

The stubs themselves are ``users.v1.user_service_pb2`` and ``users.v1.user_service_pb2_grpc``;
the error details are googleapis-common-protos' ``google.rpc.error_details_pb2``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

import grpc
import jwt
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from users.v1 import error_reason_pb2, user_service_pb2

__all__ = [
    "ERROR_DOMAIN",
    "REFETCH_INTERVAL_SECONDS",
    "AccessClaims",
    "InvalidToken",
    "TokenVerifier",
    "error_reason",
    "error_reason_enum",
]

ERROR_DOMAIN = "users.v1"
# The contract's enum names carry this prefix; the reason on the wire does not.
_REASON_PREFIX = "ERROR_REASON_"
# How often, at most, an unknown kid makes the verifier fetch the key set again: a flood of
# tokens with made-up kids costs one call per interval.
REFETCH_INTERVAL_SECONDS = 5.0
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "iat", "exp", "jti", "role", "sid", "ver"]


def error_reason(error: grpc.RpcError) -> str:
    """The ErrorInfo reason of a refused call (``"MFA_REQUIRED"``, ...), or "" if it has none."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return str(info.reason)
    return ""


def error_reason_enum(error: grpc.RpcError) -> error_reason_pb2.ErrorReason.ValueType:
    """:func:`error_reason` as the contract's enum: ERROR_REASON_UNSPECIFIED for none, or for a
    reason this client does not know (a newer server's): act on the status code then."""
    name = _REASON_PREFIX + error_reason(error)
    values = error_reason_pb2.ErrorReason.DESCRIPTOR.values_by_name
    return error_reason_pb2.ErrorReason.Value(name) if name in values else error_reason_pb2.ERROR_REASON_UNSPECIFIED


class InvalidToken(Exception):
    """The token is not a valid access token of the service."""


@dataclass(frozen=True)
class AccessClaims:
    """What a verified access token says: see GetPublicKeys in the contract."""

    subject: str  # the user id
    role: Literal["user", "admin"]
    session_id: str
    version: int  # the user's token version: opaque here, the server checks it
    token_id: str
    issued_at: datetime
    expires_at: datetime


class _PublicKeys(Protocol):
    def GetPublicKeys(self, request: user_service_pb2.GetPublicKeysRequest) -> Any: ...


class TokenVerifier:
    """Verifies access tokens with the service's public keys (GetPublicKeys), which it fetches
    once, caches, and fetches again when a token names a key id it does not know (a rotation).

    A locally verified token stays valid until it expires even if the user's tokens were revoked
    meanwhile (the server sees that through the ``ver`` claim; a local verifier cannot). Call
    ValidateToken instead where that matters. Thread-safe; the fetch is a blocking call.
    """

    def __init__(self, stub: _PublicKeys, *, issuer: str, audience: str, leeway_seconds: float = 5.0) -> None:
        self._stub = stub
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway_seconds
        self._lock = threading.Lock()
        self._keys: dict[str, Any] | None = None
        self._last_fetch = 0.0

    def verify(self, token: str) -> AccessClaims:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed access token") from None
        kid = header.get("kid")
        if header.get("typ") != "at+jwt" or header.get("alg") != "ES256" or not isinstance(kid, str):
            raise InvalidToken("not an access token")
        key = self._key(kid)
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["ES256"],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": _REQUIRED_CLAIMS},
            )
        except jwt.PyJWTError as error:
            raise InvalidToken(f"invalid access token: {error}") from None
        role, version, session_id = claims["role"], claims["ver"], claims["sid"]
        if role not in ("user", "admin"):
            raise InvalidToken(f"unknown role {role!r}")
        if not isinstance(version, int) or isinstance(version, bool) or not isinstance(session_id, str):
            raise InvalidToken("a claim is malformed")
        return AccessClaims(
            subject=str(claims["sub"]),
            role=role,
            session_id=session_id,
            version=version,
            token_id=str(claims["jti"]),
            issued_at=datetime.fromtimestamp(claims["iat"], UTC),
            expires_at=datetime.fromtimestamp(claims["exp"], UTC),
        )

    def _key(self, kid: str) -> Any:
        with self._lock:
            stale = time.monotonic() - self._last_fetch >= REFETCH_INTERVAL_SECONDS
            if self._keys is None or (kid not in self._keys and stale):
                self._last_fetch = time.monotonic()
                self._keys = self._fetch()
            key = self._keys.get(kid)
        if key is None:
            raise InvalidToken(f"access token signed by an unknown key {kid!r}")
        return key

    def _fetch(self) -> dict[str, Any]:
        reply = self._stub.GetPublicKeys(user_service_pb2.GetPublicKeysRequest())
        keys: dict[str, Any] = {}
        for entry in json.loads(reply.jwks_json)["keys"]:
            # Only the keys this service makes; anything else in the set is never trusted.
            if (entry.get("kty"), entry.get("crv"), entry.get("alg")) != ("EC", "P-256", "ES256"):
                continue
            keys[entry["kid"]] = jwt.PyJWK.from_dict(entry).key
        return keys
