"""The account lifecycle: register, activate, look up, check credentials, delete.

Services see only domain types and the ports of :mod:`users_grpc.ports`.
"""

from __future__ import annotations

import dataclasses
import hmac
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from users_grpc import domain
from users_grpc.domain import (
    ANONYMOUS,
    Account,
    ActivationCode,
    Caller,
    Mail,
    NewUser,
    PasswordPolicy,
    Registration,
    Role,
    User,
)
from users_grpc.errors import (
    AccountNotActive,
    InvalidActivationCode,
    InvalidCredentials,
    NotFound,
    PermissionDenied,
)
from users_grpc.ports import Clock, Mailer, PasswordHasher, UserRepository

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class AccountPolicy:
    password: PasswordPolicy = field(default_factory=PasswordPolicy)
    activation_code_ttl: timedelta = timedelta(minutes=15)
    activation_max_attempts: int = 5
    activation_max_sends: int = 5
    activation_send_window: timedelta = timedelta(hours=1)
    password_max_attempts: int = 10
    password_attempt_window: timedelta = timedelta(minutes=15)


class UserService:
    def __init__(
        self,
        *,
        users: UserRepository,
        mailer: Mailer,
        hasher: PasswordHasher,
        clock: Clock,
        policy: AccountPolicy,
    ) -> None:
        self._users = users
        self._mailer = mailer
        self._hasher = hasher
        self._clock = clock
        self._policy = policy

    async def create_user(self, registration: Registration, caller: Caller = ANONYMOUS) -> User:
        """Store a new inactive user and mail them an activation code."""
        domain.validate_registration(registration, password_policy=self._policy.password)
        if registration.role is Role.ADMIN and not caller.is_admin:
            raise PermissionDenied("only an admin can create an admin")
        code = domain.new_activation_code()
        user = await self._users.add(
            await self._new_user(registration, activation=self._new_activation(registration.username, code))
        )
        await self._mailer.send(self._activation_mail(user, code))
        log.info("user created", extra={"user_id": user.id})
        return user

    async def create_admin(self, registration: Registration) -> User:
        """Store an active admin, for operators bootstrapping a deployment from the CLI."""
        domain.validate_registration(registration, password_policy=self._policy.password)
        user = await self._users.add(
            await self._new_user(dataclasses.replace(registration, role=Role.ADMIN), activation=None)
        )
        log.info("admin created", extra={"user_id": user.id})
        return user

    async def _new_user(self, registration: Registration, *, activation: ActivationCode | None) -> NewUser:
        return NewUser(
            username=registration.username,
            first_name=registration.first_name.strip(),
            last_name=registration.last_name.strip(),
            email=registration.email,
            gender=registration.gender,
            role=registration.role,
            password_hash=await self._hasher.hash(registration.password),
            is_active=activation is None,
            activation=activation,
            created_at=self._clock.now(),
        )

    async def activate_user(self, identifier: str, code: str) -> User:
        """Activate with the mailed code. Every failure looks the same, whatever the account."""
        domain.validate_identifier(identifier)
        domain.validate_activation_code(code)
        account = await self._users.find_account(domain.identifier_key(identifier))
        if account is None or account.user.is_active or account.activation is None:
            raise InvalidActivationCode()
        user_id = account.user.id
        digest = domain.activation_code_digest(account.user.username, code)
        now = self._clock.now()
        # The attempt is spent before the code is compared, so parallel guesses cannot exceed the cap.
        pending = await self._users.reserve_activation_attempt(user_id, now)
        activated = None
        if pending is not None and hmac.compare_digest(pending.digest, digest):
            activated = await self._users.activate(user_id, digest, now)
        if activated is None:
            log.info("activation refused", extra={"user_id": user_id})
            raise InvalidActivationCode()
        log.info("user activated", extra={"user_id": user_id})
        return activated

    async def resend_activation_code(self, identifier: str) -> None:
        """Mail a fresh code to an inactive account; do nothing, visibly the same, otherwise."""
        domain.validate_identifier(identifier)
        account = await self._users.find_account(domain.identifier_key(identifier))
        if account is None or account.user.is_active:
            return
        code = domain.new_activation_code()
        pended = await self._users.replace_activation_code(
            account.user.id,
            self._new_activation(account.user.username, code),
            max_sends=self._policy.activation_max_sends,
            window_seconds=int(self._policy.activation_send_window.total_seconds()),
        )
        if pended:
            await self._mailer.send(self._activation_mail(account.user, code))
        else:
            log.info("activation resend capped", extra={"user_id": account.user.id})

    async def get_user(self, user_id: str) -> User:
        domain.validate_user_id(user_id)
        user = await self._users.get(user_id)
        if user is None:
            raise NotFound()
        return user

    async def get_active_user_by_identifier(self, identifier: str) -> User:
        domain.validate_identifier(identifier)
        account = await self._users.find_account(domain.identifier_key(identifier))
        if account is None or not account.user.is_active:
            raise NotFound()
        return account.user

    async def delete_user(self, user_id: str, *, password: str, caller: Caller) -> None:
        """Delete a user. One's own account takes the current password, not just a token;
        an admin deleting someone else needs none."""
        domain.validate_user_id(user_id)
        if caller.user_id == user_id:
            domain.validate_login_password(password)
            account = await self._users.get_account(user_id)
            if not await self.password_matches(account, password):
                raise InvalidCredentials()
        elif not caller.is_admin:
            raise PermissionDenied()
        if not await self._users.delete(user_id):
            raise NotFound()
        log.info("user deleted", extra={"user_id": user_id})

    async def delete_user_by_identifier(self, identifier: str) -> None:
        domain.validate_identifier(identifier)
        if not await self._users.delete_by_identifier(domain.identifier_key(identifier)):
            raise NotFound()
        log.info("user deleted by identifier")

    async def verify_credentials(self, identifier: str, password: str) -> User:
        """The user if the password matches; one answer for unknown accounts and wrong passwords."""
        domain.validate_identifier(identifier)
        domain.validate_login_password(password)
        account = await self._users.find_account(domain.identifier_key(identifier))
        if not await self.password_matches(account, password):
            raise InvalidCredentials()
        assert account is not None
        if not account.user.is_active:
            raise AccountNotActive()
        log.info("credentials verified", extra={"user_id": account.user.id})
        return account.user

    async def password_matches(self, account: Account | None, password: str) -> bool:
        """Check a password, throttled per account; a missing account costs the same bcrypt run.

        Past the attempt cap even the right password fails, with the same answer as a wrong
        one, until the window passes; a match sets the count back to zero.
        """
        if account is None:
            await self._hasher.verify(password, None)
            log.info("credentials refused", extra={"user_id": None})
            return False
        user_id = account.user.id
        allowed = await self._users.reserve_password_attempt(
            user_id,
            self._clock.now(),
            max_attempts=self._policy.password_max_attempts,
            window_seconds=int(self._policy.password_attempt_window.total_seconds()),
        )
        matches = await self._hasher.verify(password, account.password_hash)
        if not allowed:
            log.warning("password attempts throttled", extra={"user_id": user_id})
            return False
        if not matches:
            log.info("credentials refused", extra={"user_id": user_id})
            return False
        await self._users.clear_password_attempts(user_id)
        return True

    def _new_activation(self, username: str, code: str) -> ActivationCode:
        """A pending code that opens a fresh resend window (the repository keeps a running one)."""
        now = self._clock.now()
        return ActivationCode(
            digest=domain.activation_code_digest(username, code),
            expires_at=now + self._policy.activation_code_ttl,
            attempts_left=self._policy.activation_max_attempts,
            sends_in_window=1,
            window_started_at=now,
        )

    def _activation_mail(self, user: User, code: str) -> Mail:
        minutes = int(self._policy.activation_code_ttl.total_seconds() // 60)
        return Mail(
            to=user.email,
            subject="Your activation code",
            body=(
                f"Hello {user.first_name},\n\n"
                f"your activation code is {code}\n\n"
                f"It works once and expires in {minutes} minutes.\n"
                "If you did not create an account, ignore this email.\n"
            ),
        )
