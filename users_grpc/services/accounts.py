"""The account lifecycle: register, activate, look up, check credentials, delete.

Services see only domain types and the ports of :mod:`users_grpc.domain.ports`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from users_grpc.domain import rules
from users_grpc.domain.errors import (
    AccountDeactivated,
    AccountLocked,
    AccountNotActive,
    AlreadyExists,
    FailedPrecondition,
    FieldViolation,
    InvalidActivationCode,
    InvalidArgument,
    InvalidCredentials,
    NotFound,
    Overloaded,
    PermissionDenied,
)
from users_grpc.domain.model import (
    ANONYMOUS,
    Account,
    ActivationCode,
    Caller,
    ImportedUser,
    Mail,
    NewUser,
    PasswordScheme,
    Registration,
    Role,
    User,
    UserState,
)
from users_grpc.domain.ports import Clock, Mailer, MailRenderer, PasswordHasher, SecretDigests, UserRepository
from users_grpc.domain.rules import PasswordPolicy
from users_grpc.services.last_admin import keep_an_active_admin
from users_grpc.services.password_policy import PasswordRules
from users_grpc.services.throttling import PasswordThrottle

log = logging.getLogger(__name__)

# Told only after the right password, as for accounts not yet activated.
NOT_ACTIVE_ERRORS = _NOT_ACTIVE_ERRORS = {
    UserState.PENDING_ACTIVATION: AccountNotActive,
    UserState.DEACTIVATED: AccountDeactivated,
    UserState.LOCKED: AccountLocked,
}
# A delete retries this often when the user changes between its steps (promoted, say), then gives up.
_DELETE_ROUNDS = 3


@contextlib.asynccontextmanager
async def no_reply_sooner_than(floor: timedelta) -> AsyncIterator[None]:
    """Hold the reply back to a fixed floor, whatever the outcome.

    For anonymous calls about an account named by the caller: the work differs by a few
    milliseconds between existing and missing accounts (a write for one, none for the
    other), which the floor hides.
    """
    started = time.monotonic()
    try:
        yield
    finally:
        await asyncio.sleep(max(0.0, floor.total_seconds() - (time.monotonic() - started)))


@dataclass(frozen=True, kw_only=True)
class AccountPolicy:
    password: PasswordPolicy = field(default_factory=PasswordPolicy)
    activation_code_ttl: timedelta = timedelta(minutes=15)
    activation_max_attempts: int = 5
    activation_max_sends: int = 5
    activation_send_window: timedelta = timedelta(hours=1)
    # Longer than the send window, so a stranger who spends the resends cannot outlast the newest mail.
    activation_token_ttl: timedelta = timedelta(hours=24)
    # Anonymous calls about a named account answer no sooner than this (no_reply_sooner_than).
    reply_floor: timedelta = timedelta(milliseconds=200)
    # The costliest imported bcrypt hash taken: our own cost, so a guess costs the same on any account.
    max_imported_hash_cost: int = rules.MAX_IMPORTED_BCRYPT_COST


class AccountService:
    def __init__(
        self,
        *,
        users: UserRepository,
        mailer: Mailer,
        mail_renderer: MailRenderer,
        hasher: PasswordHasher,
        digests: SecretDigests,
        clock: Clock,
        policy: AccountPolicy,
        throttle: PasswordThrottle,
        password_rules: PasswordRules | None = None,
    ) -> None:
        self._throttle = throttle
        # Only its breached-password check: a new account has no history yet.
        self._password_rules = password_rules or PasswordRules(hasher=hasher)
        self._users = users
        self._mailer = mailer
        # Public: the services built on this one (passwords, MFA, email change) mail through it too.
        self.mail_renderer = mail_renderer
        self._hasher = hasher
        self._digests = digests
        self._clock = clock
        self._policy = policy

    async def create_user(self, registration: Registration, caller: Caller = ANONYMOUS) -> User:
        """Store a new inactive user and mail them an activation code."""
        rules.validate_registration(registration, password_policy=self._policy.password)
        if registration.role is Role.ADMIN and not caller.is_admin:
            raise PermissionDenied("only an admin can create an admin")
        await self._password_rules.refuse_breached(registration.password, "password")
        code, token = rules.new_activation_code(), rules.new_activation_token()
        user_id = self._users.new_id()
        user = await self._users.add(
            await self._new_user(registration, user_id=user_id, activation=self._new_activation(user_id, code, token))
        )
        await self._mailer.send(self._activation_mail(user, code, token))
        log.info("user created", extra={"user_id": user.id})
        return user

    async def create_admin(self, registration: Registration) -> User:
        """Store an active admin, for operators bootstrapping a deployment from the CLI."""
        rules.validate_registration(registration, password_policy=self._policy.password)
        await self._password_rules.refuse_breached(registration.password, "password")
        user = await self._users.add(
            await self._new_user(
                dataclasses.replace(registration, role=Role.ADMIN), user_id=self._users.new_id(), activation=None
            )
        )
        log.info("admin created", extra={"user_id": user.id})
        return user

    async def import_users(
        self, items: Sequence[ImportedUser | InvalidArgument], caller: Caller
    ) -> list[User | InvalidArgument | AlreadyExists]:
        """Create each user, or say why not, item by item; :class:`InvalidArgument` for the whole
        call only past :data:`~users_grpc.domain.rules.MAX_IMPORTED_USERS`.

        ``items`` holds, in place of an item, the error its conversion met (an unknown enum
        number). Retrying is safe: the unique indexes answer ALREADY_EXISTS for whoever was
        created before. No mail goes out (see the ImportUsers proto comment).
        """
        if len(items) > rules.MAX_IMPORTED_USERS:
            raise InvalidArgument(
                [FieldViolation("users", f"at most {rules.MAX_IMPORTED_USERS} users per call; split the batch")]
            )
        results: list[User | InvalidArgument | AlreadyExists] = []
        for index, item in enumerate(items):
            try:
                if isinstance(item, InvalidArgument):
                    raise item
                results.append(await self._import_user(item))
            except InvalidArgument as error:
                results.append(
                    InvalidArgument(
                        [FieldViolation(f"users[{index}].{v.field}", v.description) for v in error.violations]
                    )
                )
            except AlreadyExists as error:
                results.append(error)
        created = sum(isinstance(result, User) for result in results)
        log.info(
            "users imported",
            extra={
                "admin_id": caller.user_id,
                "users_requested": len(items),
                "users_created": created,
                "users_refused": len(items) - created,
            },
        )
        return results

    async def _import_user(self, item: ImportedUser) -> User:
        rules.validate_imported_user(item, max_cost=self._policy.max_imported_hash_cost)
        user = await self._users.add(
            NewUser(
                id=self._users.new_id(),
                username=item.username,
                first_name=item.first_name.strip(),
                last_name=item.last_name.strip(),
                email=rules.normalized_email(item.email),
                gender=item.gender,
                role=item.role,
                password_hash=item.password_hash,
                password_scheme=PasswordScheme.BCRYPT if item.password_hash else PasswordScheme.NONE,
                # Unverified: pending, with no code yet; ResendActivationCode mails the first.
                is_active=item.email_verified,
                activation=None,
                created_at=self._clock.now(),
                imported=True,
                password_change_required=item.password_change_required,
                external_id=item.external_id,
            )
        )
        log.info("user imported", extra={"user_id": user.id, "active": user.is_active})
        return user

    async def _new_user(
        self, registration: Registration, *, user_id: str, activation: ActivationCode | None
    ) -> NewUser:
        return NewUser(
            id=user_id,
            username=registration.username,
            first_name=registration.first_name.strip(),
            last_name=registration.last_name.strip(),
            email=rules.normalized_email(registration.email),
            gender=registration.gender,
            role=registration.role,
            password_hash=await self._hasher.hash(registration.password),
            is_active=activation is None,
            activation=activation,
            created_at=self._clock.now(),
            language_code=registration.language_code,
        )

    async def activate_user(self, identifier: str, code: str, token: str = "") -> User:
        """Activate with the mailed code or token. Every failure looks the same, whatever the account.

        Wrong codes use the code up (it has only a million values), so a stranger can kill a
        code; the token mailed with it cannot be guessed, has no attempt cap, and outlives the
        resend window: the owner of the mailbox can always activate with the newest mail.
        """
        rules.validate_identifier(identifier)
        rules.validate_activation(code, token)
        async with no_reply_sooner_than(self._policy.reply_floor):
            account = await self._users.find_account(rules.identifier_key(identifier))
            if account is None or account.user.is_active or account.activation is None:
                raise InvalidActivationCode()
            if token:
                return await self._activate_with_token(account.user.id, account.activation.token_digest, token)
            return await self._activate(account.user.id, code)

    async def _activate_with_token(self, user_id: str, stored_digest: str, token: str) -> User:
        activated = None
        # Checked under the digest root the stored digest names; the update matches that digest,
        # so a token mailed again meanwhile (a new digest) is not taken for this one.
        if self._digests.matches(stored_digest, "activation-token", user_id, token):
            activated = await self._users.activate_with_token(user_id, stored_digest, self._clock.now())
        if activated is None:
            log.info("activation refused", extra={"user_id": user_id})
            raise InvalidActivationCode()
        log.info("user activated", extra={"user_id": user_id})
        return activated

    async def _activate(self, user_id: str, code: str) -> User:
        now = self._clock.now()
        # The attempt is spent before the code is compared, so parallel guesses cannot exceed the cap.
        pending = await self._users.reserve_activation_attempt(user_id, now)
        activated = None
        if pending is not None and self._digests.matches(pending.digest, "activation-code", user_id, code):
            activated = await self._users.activate(user_id, pending.digest, now)
        if activated is None:
            log.info("activation refused", extra={"user_id": user_id})
            raise InvalidActivationCode()
        log.info("user activated", extra={"user_id": user_id})
        return activated

    async def resend_activation_code(self, identifier: str) -> None:
        """Mail a fresh code to an inactive account; do nothing, visibly the same, otherwise."""
        rules.validate_identifier(identifier)
        async with no_reply_sooner_than(self._policy.reply_floor):
            await self._resend_activation_code(identifier)

    async def _resend_activation_code(self, identifier: str) -> None:
        account = await self._users.find_account(rules.identifier_key(identifier))
        if account is None or account.user.state is not UserState.PENDING_ACTIVATION:
            return
        code, token = rules.new_activation_code(), rules.new_activation_token()
        pended = await self._users.replace_activation_code(
            account.user.id,
            self._new_activation(account.user.id, code, token),
            max_sends=self._policy.activation_max_sends,
            window_seconds=int(self._policy.activation_send_window.total_seconds()),
        )
        if pended:
            await self._mailer.send(self._activation_mail(account.user, code, token))
        else:
            log.info("activation resend capped", extra={"user_id": account.user.id})

    async def get_user(self, user_id: str, *, caller: Caller | None = None) -> User:
        rules.validate_user_id(user_id)
        if caller is not None and caller.user is not None and caller.user.id == user_id:
            # Read moments ago in this same call to check the caller's token: one read serves both.
            return caller.user
        user = await self._users.get(user_id)
        if user is None:
            raise NotFound()
        return user

    async def get_active_user_by_identifier(self, identifier: str) -> User:
        rules.validate_identifier(identifier)
        account = await self._users.find_account(rules.identifier_key(identifier))
        if account is None or not account.user.is_active:
            raise NotFound()
        return account.user

    async def delete_user(self, user_id: str, *, password: str, caller: Caller) -> None:
        """Delete a user. One's own account takes the current password, not just a token;
        an admin deleting someone else needs none."""
        rules.validate_user_id(user_id)
        if caller.user_id == user_id:
            rules.validate_login_password(password)
            account = await self._users.get_account(user_id)
            if not await self.password_matches(account, password, source=caller.source):
                raise InvalidCredentials()
        elif not (caller.is_admin or caller.is_provisioner):  # a provisioner never reaches an admin (access.py)
            raise PermissionDenied()
        await self._delete(user_id)
        log.info("user deleted", extra={"user_id": user_id})

    async def delete_user_by_identifier(self, identifier: str) -> None:
        rules.validate_identifier(identifier)
        account = await self._users.find_account(rules.identifier_key(identifier))
        if account is None:
            raise NotFound()
        await self._delete(account.user.id)
        log.info("user deleted by identifier", extra={"user_id": account.user.id})

    async def _delete(self, user_id: str) -> None:
        """Delete the user, unless they are the last active admin."""
        for _ in range(_DELETE_ROUNDS):
            if await self._users.delete_unless_active_admin(user_id):
                return
            user = await self._users.get(user_id)
            if user is None:
                raise NotFound()
            if not user.is_active_admin:
                continue  # demoted or suspended since the delete looked: look again
            # An active admin: deactivate first, so that the admins left can be counted (a delete
            # cannot be undone), then delete. A crash in between leaves the admin deactivated.
            now = self._clock.now()
            before = await self._users.change_state(
                user_id, from_states=frozenset({UserState.ACTIVE}), to=UserState.DEACTIVATED, now=now
            )
            if before is None:
                continue
            await keep_an_active_admin(
                self._users,
                before,
                undo=lambda: self._users.change_state(
                    user_id,
                    from_states=frozenset({UserState.DEACTIVATED}),
                    to=UserState.ACTIVE,
                    now=self._clock.now(),
                ),
            )
            if await self._users.delete(user_id):
                return
            raise NotFound()
        raise FailedPrecondition("the user changed while being deleted; try again")

    async def verify_credentials(self, identifier: str, password: str, *, source: str) -> User:
        """The user if the password matches; one answer for unknown accounts and wrong passwords."""
        rules.validate_identifier(identifier)
        rules.validate_login_password(password)
        key = rules.identifier_key(identifier)
        account = await self._users.find_account(key)
        if not await self.password_matches(account, password, source=source, unknown_key=key):
            raise InvalidCredentials()
        assert account is not None
        if not account.user.is_active:
            raise _NOT_ACTIVE_ERRORS[account.user.state]()
        log.info("credentials verified", extra={"user_id": account.user.id})
        return account.user

    async def password_matches(
        self, account: Account | None, password: str, *, source: str, unknown_key: str = ""
    ) -> bool:
        """Check a password, throttled per account and source (see :mod:`users_grpc.services.throttling`).

        A missing account goes through the same throttle, under ``unknown_key``, and the same
        bcrypt run, so neither the answers nor the work tell it from a wrong password.
        """
        throttle_key = account.user.id if account is not None else f"unknown:{unknown_key}"
        reservation = await self._throttle.reserve(throttle_key, source)
        try:
            matches = await self._hasher.verify(
                password,
                None if account is None else account.password_hash,
                PasswordScheme.PEPPERED if account is None else account.password_scheme,
            )
        except Overloaded:
            # Refused before any comparison: this try must not count against the account.
            await self._throttle.release(reservation)
            raise
        except BaseException:
            # Cancelled or broken while comparing: still counted, but no longer holding up other tries.
            await self._throttle.failed(reservation)
            raise
        if not matches:
            await self._throttle.failed(reservation)
            log.info("credentials refused", extra={"user_id": None if account is None else account.user.id})
            return False
        await self._throttle.succeeded(reservation)
        assert account is not None
        if account.password_scheme is PasswordScheme.BCRYPT:
            await self._upgrade_imported_hash(account, password)
        return True

    async def _upgrade_imported_hash(self, account: Account, password: str) -> None:
        """Replace an imported plain-bcrypt hash by one of our scheme, now that the password is known.

        One conditional update on the old hash: a password changed meanwhile wins. A full
        hashing queue only postpones this to a later sign-in; it never fails this one.
        """
        try:
            new_hash = await self._hasher.hash(password)
        except Overloaded:
            log.info("imported password hash kept for now: hashing queue full", extra={"user_id": account.user.id})
            return
        if await self._users.upgrade_password_hash(account.user.id, account.password_hash, new_hash):
            log.info("imported password hash replaced", extra={"user_id": account.user.id})

    async def owner_proved_mailbox(self, user_id: str, source: str) -> None:
        """After a completed password reset: forget the account's failed tries, so the owner gets in at once."""
        await self._throttle.forget_account(user_id)
        log.info("password failures forgotten", extra={"user_id": user_id, "source": source})

    def _activation_digest(self, user_id: str, code: str) -> str:
        # Keyed and bound to the user: without the key, a copy of the database cannot test the
        # million possible codes, and a digest moved to another account matches nothing there.
        return self._digests.digest("activation-code", user_id, code)

    def _new_activation(self, user_id: str, code: str, token: str) -> ActivationCode:
        """A pending code and token that open a fresh resend window (the repository keeps a running one)."""
        now = self._clock.now()
        return ActivationCode(
            digest=self._activation_digest(user_id, code),
            expires_at=now + self._policy.activation_code_ttl,
            attempts_left=self._policy.activation_max_attempts,
            sends_in_window=1,
            window_started_at=now,
            token_digest=self._digests.digest("activation-token", user_id, token),
            token_expires_at=now + self._policy.activation_token_ttl,
        )

    def _activation_mail(self, user: User, code: str, token: str) -> Mail:
        # Mails greet by username, whose charset is safe; names are free text a stranger chose.
        minutes = int(self._policy.activation_code_ttl.total_seconds() // 60)
        hours = int(self._policy.activation_token_ttl.total_seconds() // 3600)
        return self.mail_renderer.render(
            "activation",
            to=user.email,
            values=mail_values(user) | {"code": code, "token": token, "minutes": minutes, "hours": hours},
            language=user.language_code or None,
        )


def mail_values(user: User) -> dict[str, str | int]:
    """What every mail's template may greet a user by: the username (a safe charset), and the
    first name, free text a stranger chose, which the renderer escapes (the shipped templates
    do not use it)."""
    return {"username": user.username, "first_name": user.first_name}
