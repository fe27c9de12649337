"""The relying party's WebAuthn work, done by py_webauthn (Duo Labs): options as the JSON a
browser takes, and the checks of a registration or an assertion (challenge, origin, RP id hash,
user presence and verification, signature, attestation format "none" or self "packed").

We parse no CBOR or COSE ourselves: every byte of the authenticator's output goes through
py_webauthn. What it refuses, in whatever way (its own exceptions, or a ValueError of the CBOR or
base64 decoders under it), becomes one domain error.
"""

from __future__ import annotations

import json
import logging
from datetime import timedelta

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import parse_authentication_credential_json, parse_registration_credential_json
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from users_grpc.domain.errors import FieldViolation, InvalidArgument, InvalidPasskey, InvalidPasskeyRegistration
from users_grpc.domain.passkeys import AllowedCredential, AssertionClaim, NewCredential, VerifiedAssertion

log = logging.getLogger(__name__)

# EdDSA first (the smallest keys and signatures), then the ES256 every authenticator has, and RS256
# for Windows Hello's older TPM keys.
_ALGORITHMS = [
    COSEAlgorithmIdentifier.EDDSA,
    COSEAlgorithmIdentifier.ECDSA_SHA_256,
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,
]
# RecursionError: JSON (or CBOR) nested deeper than its parser goes, well within the 64 KiB allowed.
_REFUSALS = (WebAuthnException, ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError)
_TRANSPORTS = {transport.value: transport for transport in AuthenticatorTransport}


class WebAuthnRelyingParty:
    """One relying party: its id (the domain the credentials are scoped to), its name, and the
    origins (scheme, host, port) whose pages may use them."""

    def __init__(self, *, rp_id: str, rp_name: str, origins: tuple[str, ...], timeout: timedelta) -> None:
        self._rp_id = rp_id
        self._rp_name = rp_name
        self._origins = list(origins)
        self._timeout_ms = int(timeout.total_seconds() * 1000)

    def registration_options(
        self, *, challenge: bytes, user_handle: bytes, user_name: str, exclude: list[AllowedCredential]
    ) -> str:
        options = generate_registration_options(
            rp_id=self._rp_id,
            rp_name=self._rp_name,
            user_id=user_handle,
            user_name=user_name,
            user_display_name=user_name,
            challenge=challenge,
            timeout=self._timeout_ms,
            attestation=AttestationConveyancePreference.NONE,
            # A discoverable credential, so that the same passkey also signs in without a username.
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED,
                user_verification=UserVerificationRequirement.PREFERRED,
            ),
            exclude_credentials=[_descriptor(c) for c in exclude],
            supported_pub_key_algs=_ALGORITHMS,
        )
        return options_to_json(options)

    def verify_registration(self, credential_json: str, *, challenge: bytes) -> NewCredential:
        try:
            parsed = parse_registration_credential_json(credential_json)
            verified = verify_registration_response(
                credential=parsed,
                expected_challenge=challenge,
                expected_rp_id=self._rp_id,
                expected_origin=self._origins,
                require_user_verification=False,
                supported_pub_key_algs=_ALGORITHMS,
            )
        except _REFUSALS as error:
            log.info("passkey registration refused", extra={"why": _why(error)})
            raise InvalidPasskeyRegistration(
                "credential_json", f"the registration did not verify: {_why(error)}"
            ) from None
        transports = tuple(t.value for t in parsed.response.transports or () if isinstance(t, AuthenticatorTransport))
        return NewCredential(
            credential_id=verified.credential_id,
            public_key=verified.credential_public_key,
            sign_count=verified.sign_count,
            aaguid=verified.aaguid,
            backup_eligible=verified.credential_device_type is CredentialDeviceType.MULTI_DEVICE,
            backed_up=verified.credential_backed_up,
            transports=transports,
        )

    def sign_in_options(
        self, *, challenge: bytes, allow: list[AllowedCredential], user_verification_required: bool
    ) -> str:
        options = generate_authentication_options(
            rp_id=self._rp_id,
            challenge=challenge,
            timeout=self._timeout_ms,
            allow_credentials=[_descriptor(c) for c in allow],
            user_verification=UserVerificationRequirement.REQUIRED
            if user_verification_required
            else UserVerificationRequirement.PREFERRED,
        )
        return options_to_json(options)

    def assertion_claim(self, credential_json: str) -> AssertionClaim:
        try:
            parsed = parse_authentication_credential_json(credential_json)
        except _REFUSALS:
            raise InvalidArgument(
                [FieldViolation("credential_json", "must be the browser's AuthenticationResponseJSON")]
            ) from None
        return AssertionClaim(credential_id=parsed.raw_id, user_handle=parsed.response.user_handle or None)

    def verify_assertion(
        self, credential_json: str, *, challenge: bytes, public_key: bytes, user_verification_required: bool
    ) -> VerifiedAssertion:
        try:
            verified = verify_authentication_response(
                credential=credential_json,
                expected_challenge=challenge,
                expected_rp_id=self._rp_id,
                expected_origin=self._origins,
                credential_public_key=public_key,
                # The count is judged by the service (a regression is refused and notified): 0 here
                # lets py_webauthn check everything else.
                credential_current_sign_count=0,
                require_user_verification=user_verification_required,
            )
        except _REFUSALS as error:
            log.info("passkey assertion refused", extra={"why": _why(error)})
            raise InvalidPasskey() from None
        return VerifiedAssertion(sign_count=verified.new_sign_count, backed_up=verified.credential_backed_up)


def _descriptor(credential: AllowedCredential) -> PublicKeyCredentialDescriptor:
    transports = [_TRANSPORTS[t] for t in credential.transports if t in _TRANSPORTS]
    return PublicKeyCredentialDescriptor(id=credential.credential_id, transports=transports or None)


def _why(error: BaseException) -> str:
    # py_webauthn's messages name the check that failed, never key material; bounded for the logs.
    return (str(error) or type(error).__name__)[:200]


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False
