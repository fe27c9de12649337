"""Passkeys (WebAuthn): registration, passwordless sign-in, and the account's factors.

Every challenge lives in the database as a ceremony, single-use, expiring, bound to its purpose
and user (:class:`~users_grpc.domain.ports.CeremonyStore`), so any replica finishes what another
started and of two finishes exactly one gets it. A sign-in's options are the same for every
identifier, of an account or not: no credential is listed (every passkey is discoverable).
"""

from __future__ import annotations

import logging
import secrets
import unicodedata
from datetime import timedelta

from users_grpc.domain import rules
from users_grpc.domain.errors import (
    FieldViolation,
    InvalidArgument,
    InvalidCredentials,
    InvalidPasskey,
    InvalidPasskeyRegistration,
    LastSignInMethod,
    NotFound,
    PasskeyCounterRegressed,
    PasskeyNotFound,
    PasskeysDisabled,
    ReauthenticationRequired,
)
from users_grpc.domain.model import Caller, Mail, User
from users_grpc.domain.passkeys import (
    CREDENTIAL_JSON_MAX_LENGTH,
    DEFAULT_DISPLAY_NAME,
    DISPLAY_NAME_MAX_LENGTH,
    AllowedCredential,
    Ceremony,
    CeremonyPurpose,
    PasskeyHolder,
    Removal,
    StoredPasskey,
    counter_regressed,
)
from users_grpc.domain.ports import (
    CeremonyStore,
    Clock,
    NoticeKind,
    PasskeyRepository,
    SessionRepository,
    WebAuthn,
)
from users_grpc.services.accounts import NOT_ACTIVE_ERRORS, AccountService
from users_grpc.services.notices import security_notice
from users_grpc.services.throttling import PasswordThrottle

log = logging.getLogger(__name__)

_CHALLENGE_BYTES = 32
_USER_HANDLE_BYTES = 32


class PasskeyService:
    def __init__(
        self,
        *,
        relying_party: WebAuthn | None,
        accounts: AccountService,
        passkeys: PasskeyRepository,
        ceremonies: CeremonyStore,
        sessions: SessionRepository,
        throttle: PasswordThrottle,
        clock: Clock,
        ceremony_lifetime: timedelta,
        reauthentication_window: timedelta,
    ) -> None:
        self._rp = relying_party
        self._accounts = accounts
        self._passkeys = passkeys
        self._ceremonies = ceremonies
        self._sessions = sessions
        self._throttle = throttle
        self._clock = clock
        self._ceremony_lifetime = ceremony_lifetime
        self._reauthentication_window = reauthentication_window

    # Registration -------------------------------------------------------------------------------

    async def start_registration(self, user_id: str, password: str, *, caller: Caller) -> tuple[Ceremony, str]:
        rp = self._relying_party()
        rules.validate_user_id(user_id, "user_id")
        await self._reauthenticate(user_id, password, caller)
        holder = await self._holder(user_id)
        handle = await self._passkeys.ensure_user_handle(user_id, secrets.token_bytes(_USER_HANDLE_BYTES))
        if handle is None:
            raise NotFound()
        ceremony = await self._new_ceremony(CeremonyPurpose.REGISTRATION, user_id)
        options = rp.registration_options(
            challenge=ceremony.challenge,
            user_handle=handle,
            user_name=holder.user.username,
            exclude=[
                AllowedCredential(credential_id=p.credential_id, transports=p.transports) for p in holder.passkeys
            ],
        )
        log.info("passkey registration started", extra={"user_id": user_id})
        return ceremony, options

    async def finish_registration(
        self, user_id: str, ceremony_id: str, credential_json: str, display_name: str
    ) -> StoredPasskey:
        rp = self._relying_party()
        rules.validate_user_id(user_id, "user_id")
        _validate_ceremony_id(ceremony_id)
        _validate_credential_json(credential_json)
        name = _display_name(display_name or DEFAULT_DISPLAY_NAME)
        now = self._clock.now()
        ceremony = await self._ceremonies.take(ceremony_id, CeremonyPurpose.REGISTRATION, now)
        if ceremony is None or ceremony.user_id != user_id:
            raise InvalidPasskeyRegistration("ceremony_id", "unknown, expired, used or another user's; start again")
        credential = rp.verify_registration(credential_json, challenge=ceremony.challenge)
        holder = await self._holder(user_id)
        passkey = StoredPasskey(
            id=secrets.token_hex(12),
            credential_id=credential.credential_id,
            public_key=credential.public_key,
            sign_count=credential.sign_count,
            display_name=name,
            created_at=now,
            last_used_at=None,
            aaguid=credential.aaguid,
            backup_eligible=credential.backup_eligible,
            backed_up=credential.backed_up,
            transports=credential.transports,
        )
        notice = self._notice(holder.user, "passkey-added", name)
        if not await self._passkeys.add_passkey(user_id, passkey, now, notice):
            raise InvalidPasskeyRegistration("credential_json", "the account holds as many passkeys as it may")
        log.info("passkey added", extra={"user_id": user_id, "passkey_id": passkey.id})
        return passkey

    # Sign-in ------------------------------------------------------------------------------------

    async def start_sign_in(self, identifier: str, second_factor: bool) -> tuple[Ceremony, str]:
        rp = self._relying_party()
        if identifier:
            rules.validate_identifier(identifier)
        elif second_factor:
            raise InvalidArgument([FieldViolation("identifier", "is required for a second-factor ceremony")])
        holder = None
        if identifier:
            holder = await self._passkeys.find_passkey_holder(rules.identifier_key(identifier))
        purpose = CeremonyPurpose.SECOND_FACTOR if second_factor else CeremonyPurpose.SIGN_IN
        # Bound to the account named, "" (nobody) for no account or one without passkeys, None
        # (whoever the passkey is) without a name.
        bound_to = None if not identifier else "" if holder is None or not holder.passkeys else holder.user.id
        ceremony = await self._new_ceremony(purpose, bound_to)
        # allowCredentials stays empty, for every identifier: a list of the account's passkeys (its
        # length, ids, transports) told real accounts from others however a decoy was made, and none
        # is needed, every passkey being discoverable (registered with a resident key required).
        options = rp.sign_in_options(
            challenge=ceremony.challenge, allow=[], user_verification_required=not second_factor
        )
        return ceremony, options

    async def finish_sign_in(self, ceremony_id: str, credential_json: str, *, source: str) -> User:
        """The user a passwordless assertion (user verification required) proves."""
        holder = await self._verified(ceremony_id, credential_json, CeremonyPurpose.SIGN_IN, source=source)
        if not holder.user.is_active:
            raise NOT_ACTIVE_ERRORS[holder.user.state]()
        return holder.user

    async def verify_second_factor(self, user: User, ceremony_id: str, credential_json: str, *, source: str) -> None:
        """Authenticate's second step: an assertion of one of ``user``'s passkeys."""
        holder = await self._verified(ceremony_id, credential_json, CeremonyPurpose.SECOND_FACTOR, source=source)
        if holder.user.id != user.id:
            raise InvalidPasskey()

    async def _verified(
        self, ceremony_id: str, credential_json: str, purpose: CeremonyPurpose, *, source: str
    ) -> PasskeyHolder:
        rp = self._relying_party()
        _validate_ceremony_id(ceremony_id)
        _validate_credential_json(credential_json)
        claim = rp.assertion_claim(credential_json)
        now = self._clock.now()
        ceremony = await self._ceremonies.take(ceremony_id, purpose, now)
        holder = await self._passkeys.holder_of_credential(claim.credential_id)
        throttle_key = holder.user.id if holder is not None else f"unknown-passkey:{claim.credential_id.hex()[:64]}"
        reservation = await self._throttle.reserve(throttle_key, source)
        try:
            passkey = None if holder is None else holder.by_credential(claim.credential_id)
            if ceremony is None or holder is None or passkey is None:
                raise InvalidPasskey()
            if ceremony.user_id is not None and ceremony.user_id != holder.user.id:
                raise InvalidPasskey()  # issued for another account (or for none: a decoy)
            # A discoverable credential names its user by the handle, which must be the holder's.
            if claim.user_handle is not None and claim.user_handle != holder.user_handle:
                raise InvalidPasskey()
            verified = rp.verify_assertion(
                credential_json,
                challenge=ceremony.challenge,
                public_key=passkey.public_key,
                user_verification_required=purpose is CeremonyPurpose.SIGN_IN,
            )
            if counter_regressed(passkey.sign_count, verified.sign_count):
                await self._counter_regressed(holder, passkey)
            recorded = await self._passkeys.record_passkey_use(
                holder.user.id,
                passkey.id,
                seen_count=passkey.sign_count,
                new_count=verified.sign_count,
                backed_up=verified.backed_up,
                now=now,
            )
            if not recorded:
                raise InvalidPasskey()  # another sign-in moved the count meanwhile: its assertion came first
        except BaseException:
            await self._throttle.failed(reservation)
            raise
        await self._throttle.succeeded(reservation)
        log.info("passkey used", extra={"user_id": holder.user.id, "passkey_id": passkey.id})
        return holder

    async def _counter_regressed(self, holder: PasskeyHolder, passkey: StoredPasskey) -> None:
        log.warning("passkey sign count regressed", extra={"user_id": holder.user.id, "passkey_id": passkey.id})
        notice = self._notice(holder.user, "passkey-counter-regressed", passkey.display_name)
        await self._passkeys.pend_notice(holder.user.id, notice, self._clock.now())
        raise PasskeyCounterRegressed()

    # Factors ------------------------------------------------------------------------------------

    async def factors(self, user_id: str) -> PasskeyHolder:
        rules.validate_user_id(user_id, "user_id")
        return await self._holder(user_id)

    async def rename(self, user_id: str, passkey_id: str, display_name: str) -> StoredPasskey:
        rules.validate_user_id(user_id, "user_id")
        _validate_passkey_id(passkey_id)
        name = _display_name(display_name, required=True)
        if not await self._passkeys.rename_passkey(user_id, passkey_id, name, self._clock.now()):
            raise PasskeyNotFound()
        passkey = (await self._holder(user_id)).passkey(passkey_id)
        if passkey is None:
            raise PasskeyNotFound()
        return passkey

    async def remove(self, user_id: str, passkey_id: str, password: str, *, caller: Caller) -> None:
        rules.validate_user_id(user_id, "user_id")
        _validate_passkey_id(passkey_id)
        await self._reauthenticate(user_id, password, caller)
        await self._remove(user_id, passkey_id, by_admin=False)

    async def remove_by_admin(self, user_id: str, passkey_id: str) -> None:
        rules.validate_user_id(user_id, "user_id")
        _validate_passkey_id(passkey_id)
        await self._remove(user_id, passkey_id, by_admin=True)

    async def _remove(self, user_id: str, passkey_id: str, *, by_admin: bool) -> None:
        holder = await self._holder(user_id)
        passkey = holder.passkey(passkey_id)
        if passkey is None:
            raise PasskeyNotFound()
        kind: NoticeKind = "passkey-removed-by-admin" if by_admin else "passkey-removed"
        notice = self._notice(holder.user, kind, passkey.display_name)
        outcome = await self._passkeys.remove_passkey(user_id, passkey_id, self._clock.now(), notice)
        if outcome is Removal.NOT_FOUND:
            raise PasskeyNotFound()
        if outcome is Removal.LAST_SIGN_IN_METHOD:
            raise LastSignInMethod()
        log.info("passkey removed", extra={"user_id": user_id, "passkey_id": passkey_id, "by_admin": by_admin})

    # Shared -------------------------------------------------------------------------------------

    def _relying_party(self) -> WebAuthn:
        if self._rp is None:
            raise PasskeysDisabled()
        return self._rp

    async def _holder(self, user_id: str) -> PasskeyHolder:
        holder = await self._passkeys.passkey_holder(user_id)
        if holder is None:
            raise NotFound()
        return holder

    async def _reauthenticate(self, user_id: str, password: str, caller: Caller) -> None:
        """The password, or a session begun lately: an access token alone adds or removes no factor."""
        if password:
            rules.validate_login_password(password)
            account = await self._passkeys.get_account(user_id)
            if not await self._accounts.password_matches(account, password, source=caller.source):
                raise InvalidCredentials()
            return
        now = self._clock.now()
        sessions = await self._sessions.list_active(user_id, now)
        current = next((s for s in sessions if s.id == caller.session_id), None)
        if current is None or current.created_at <= now - self._reauthentication_window:
            raise ReauthenticationRequired()

    async def _new_ceremony(self, purpose: CeremonyPurpose, user_id: str | None) -> Ceremony:
        ceremony = Ceremony(
            id=self._ceremonies.new_id(),
            purpose=purpose,
            user_id=user_id,
            challenge=secrets.token_bytes(_CHALLENGE_BYTES),
            expires_at=self._clock.now() + self._ceremony_lifetime,
        )
        await self._ceremonies.add(ceremony)
        return ceremony

    def _notice(self, user: User, kind: NoticeKind, passkey_name: str) -> Mail:
        return security_notice(self._accounts.mail_renderer, user, kind, passkey_name=_mail_safe(passkey_name))


def _validate_ceremony_id(ceremony_id: str) -> None:
    if not ceremony_id:
        raise InvalidArgument([FieldViolation("ceremony_id", "is required")])
    if len(ceremony_id) != 32 or not all(c in "0123456789abcdef" for c in ceremony_id):
        raise InvalidArgument([FieldViolation("ceremony_id", "is not a ceremony id")])


def _validate_credential_json(credential_json: str) -> None:
    if not credential_json:
        raise InvalidArgument([FieldViolation("credential_json", "is required")])
    if len(credential_json) > CREDENTIAL_JSON_MAX_LENGTH:
        raise InvalidArgument([FieldViolation("credential_json", "is longer than 64 KiB")])


def _validate_passkey_id(passkey_id: str) -> None:
    if not rules.is_id(passkey_id):
        raise InvalidArgument([FieldViolation("passkey_id", "must be 24 hexadecimal digits")])


def _display_name(name: str, *, required: bool = False) -> str:
    name = unicodedata.normalize("NFC", name.strip())
    if not name and required:
        raise InvalidArgument([FieldViolation("display_name", "is required")])
    if len(name) > DISPLAY_NAME_MAX_LENGTH or any(unicodedata.category(c).startswith("C") for c in name):
        raise InvalidArgument(
            [
                FieldViolation(
                    "display_name", f"must be 1 to {DISPLAY_NAME_MAX_LENGTH} characters, no control characters"
                )
            ]
        )
    return name


def _mail_safe(name: str) -> str:
    # A name the user chose goes into their own mail only; quotes and angle brackets dropped all the same.
    return "".join(c for c in name if c not in '"<>')
