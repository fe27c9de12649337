"""A software WebAuthn authenticator and browser for the passkey tests: real keys (ES256 or EdDSA
through ``cryptography``), real CBOR (``cbor2``), "none" or self "packed" attestation, and the
RegistrationResponseJSON / AuthenticationResponseJSON a browser hands back, with every knob a test
needs to make one wrong (origin, RP id, user verification, sign count, challenge)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Any, Literal

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

ORIGIN = "http://localhost:8080"
RP_ID = "localhost"
_UP, _UV, _BE, _BS, _AT = 0x01, 0x04, 0x08, 0x10, 0x40
AAGUID = bytes.fromhex("0123456789abcdef0123456789abcdef")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Credential:
    credential_id: bytes
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    user_handle: bytes
    sign_count: int = 0

    def cose_public_key(self) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            raw = self.key.public_key().public_bytes_raw()
            return cbor2.dumps({1: 1, 3: -8, -1: 6, -2: raw})
        numbers = self.key.public_key().public_numbers()
        return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")})

    def sign(self, data: bytes) -> bytes:
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(data)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))

    @property
    def alg(self) -> int:
        return -8 if isinstance(self.key, ed25519.Ed25519PrivateKey) else -7


@dataclass
class SoftwareAuthenticator:
    """Holds discoverable credentials per RP id, as a platform authenticator does."""

    algorithm: Literal["ES256", "EdDSA"] = "ES256"
    credentials: list[Credential] = field(default_factory=list)
    # 0: the authenticator keeps no sign count (as synced passkeys do).
    counts: bool = True

    def register(
        self,
        options_json: str,
        *,
        origin: str = ORIGIN,
        rp_id: str | None = None,
        attestation: Literal["none", "packed"] = "none",
        credential_id: bytes | None = None,
        user_verified: bool = True,
    ) -> str:
        options = json.loads(options_json)
        key: Any = (
            ed25519.Ed25519PrivateKey.generate()
            if self.algorithm == "EdDSA"
            else ec.generate_private_key(ec.SECP256R1())
        )
        credential = Credential(credential_id or secrets.token_bytes(16), key, unb64url(options["user"]["id"]))
        self.credentials.append(credential)
        client_data = _client_data("webauthn.create", options["challenge"], origin)
        attested = AAGUID + struct.pack(">H", len(credential.credential_id)) + credential.credential_id
        auth_data = (
            _rp_hash(rp_id or options["rp"]["id"])
            + bytes([_UP | (_UV if user_verified else 0) | _BE | _BS | _AT])
            + struct.pack(">I", 0)
            + attested
            + credential.cose_public_key()
        )
        statement: dict[str, Any] = {}
        if attestation == "packed":
            signature = credential.sign(auth_data + hashlib.sha256(client_data).digest())
            statement = {"alg": credential.alg, "sig": signature}
        attestation_object = cbor2.dumps({"fmt": attestation, "attStmt": statement, "authData": auth_data})
        return json.dumps(
            {
                "id": b64url(credential.credential_id),
                "rawId": b64url(credential.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": b64url(client_data),
                    "attestationObject": b64url(attestation_object),
                    "transports": ["internal", "hybrid"],
                },
                "clientExtensionResults": {},
                "authenticatorAttachment": "platform",
            }
        )

    def get(
        self,
        options_json: str,
        *,
        credential: Credential | None = None,
        origin: str = ORIGIN,
        rp_id: str | None = None,
        user_verified: bool = True,
        sign_count: int | None = None,
    ) -> str:
        options = json.loads(options_json)
        credential = credential or self.credentials[-1]
        if sign_count is None:
            credential.sign_count += 1 if self.counts else 0
            sign_count = credential.sign_count
        client_data = _client_data("webauthn.get", options["challenge"], origin)
        auth_data = (
            _rp_hash(rp_id or options["rpId"])
            + bytes([_UP | (_UV if user_verified else 0) | _BE | _BS])
            + struct.pack(">I", sign_count)
        )
        signature = credential.sign(auth_data + hashlib.sha256(client_data).digest())
        return json.dumps(
            {
                "id": b64url(credential.credential_id),
                "rawId": b64url(credential.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": b64url(client_data),
                    "authenticatorData": b64url(auth_data),
                    "signature": b64url(signature),
                    "userHandle": b64url(credential.user_handle),
                },
                "clientExtensionResults": {},
                "authenticatorAttachment": "platform",
            }
        )


def _client_data(kind: str, challenge: str, origin: str) -> bytes:
    return json.dumps({"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}).encode()


def _rp_hash(rp_id: str) -> bytes:
    return hashlib.sha256(rp_id.encode()).digest()
