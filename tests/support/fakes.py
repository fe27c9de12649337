"""In-memory fakes of the service ports, for fast unit tests of the service layer.

Each mirrors a real adapter whose behaviour the integration and end-to-end
tests check against the real database and SMTP server.
"""

from __future__ import annotations

import dataclasses
import itertools
from datetime import UTC, datetime, timedelta

import bcrypt

from users_grpc.domain.errors import AlreadyExists
from users_grpc.domain.model import (
    Account,
    ActivationCode,
    Mail,
    Mfa,
    NewUser,
    PasswordHistory,
    PasswordScheme,
    Role,
    ServiceAccount,
    Session,
    StoredKey,
    Tally,
    User,
    UserState,
)
from users_grpc.domain.rules import identifier_key
from users_grpc.domain.service_account_tokens import ServiceAccountToken, TokenHolder


class FakeClock:
    def __init__(self, start: datetime = datetime(2026, 1, 1, tzinfo=UTC)) -> None:
        self.current = start

    def now(self) -> datetime:
        return self.current

    def advance(self, **delta: float) -> None:
        self.current += timedelta(**delta)


class FakeHasher:
    """Reversible on purpose: unit tests check the service's use of the port, not bcrypt."""

    def __init__(self) -> None:
        self.verified_against_missing = 0
        # Set to an Overloaded error to play a full hashing queue: hash and verify raise it.
        self.overloaded: Exception | None = None

    async def hash(self, password: str) -> str:
        if self.overloaded is not None:
            raise self.overloaded
        return f"hashed:{password}"

    async def verify(
        self, password: str, password_hash: str | None, scheme: PasswordScheme = PasswordScheme.PEPPERED
    ) -> bool:
        if self.overloaded is not None:
            raise self.overloaded
        if password_hash and scheme is PasswordScheme.BCRYPT:  # an imported hash: plain bcrypt, as the real one
            return bcrypt.checkpw(password.encode(), password_hash.encode())
        if password_hash is None or scheme is not PasswordScheme.PEPPERED:
            self.verified_against_missing += 1
            return False
        return password_hash == f"hashed:{password}"


class FakeMailer:
    def __init__(self) -> None:
        self.sent: list[Mail] = []
        self.woken = 0

    async def send(self, mail: Mail) -> None:
        self.sent.append(mail)

    def wake(self) -> None:
        self.woken += 1


class FakeUserRepository:
    def __init__(self) -> None:
        self.accounts: dict[str, Account] = {}
        # The users added as imported (the real repository stores the flag; housekeeping spares them).
        self.imported: set[str] = set()
        self.admin_check_holder: str | None = None
        self._ids = (f"{n:024x}" for n in itertools.count(1))

    def new_id(self) -> str:
        return next(self._ids)

    async def add(self, new_user: NewUser) -> User:
        # As the real one, which stores the id as an ObjectId: an id it did not make is a bug.
        if not isinstance(new_user.id, str) or len(new_user.id) != 24:
            raise ValueError(f"not a user id: {new_user.id!r}")
        for account in self.accounts.values():
            if identifier_key(account.user.username) == identifier_key(new_user.username):
                raise AlreadyExists("username")
            if identifier_key(account.user.email) == identifier_key(new_user.email):
                raise AlreadyExists("email")
        user = User(
            id=new_user.id,
            username=new_user.username,
            first_name=new_user.first_name,
            last_name=new_user.last_name,
            email=new_user.email,
            gender=new_user.gender,
            role=new_user.role,
            state=UserState.ACTIVE if new_user.is_active else UserState.PENDING_ACTIVATION,
            created_at=new_user.created_at,
            updated_at=new_user.created_at,
        )
        self.accounts[user.id] = Account(
            user=user,
            password_hash=new_user.password_hash,
            activation=new_user.activation,
            password_scheme=new_user.password_scheme,
        )
        if new_user.imported:
            self.imported.add(user.id)
        return user

    async def get(self, user_id: str) -> User | None:
        account = self.accounts.get(user_id)
        return account.user if account else None

    async def get_account(self, user_id: str) -> Account | None:
        return self.accounts.get(user_id)

    async def find_account(self, identifier_key_: str) -> Account | None:
        for account in self.accounts.values():
            if identifier_key_ in {identifier_key(account.user.username), identifier_key(account.user.email)}:
                return account
        return None

    def _pending(self, user_id: str, now: datetime) -> tuple[Account, ActivationCode] | None:
        account = self.accounts.get(user_id)
        if account is None or account.user.is_active or account.activation is None:
            return None
        return None if account.activation.expires_at <= now else (account, account.activation)

    async def reserve_activation_attempt(self, user_id: str, now: datetime) -> ActivationCode | None:
        pending = self._pending(user_id, now)
        if pending is None or pending[1].attempts_left <= 0:
            return None
        code = dataclasses.replace(pending[1], attempts_left=pending[1].attempts_left - 1)
        self.accounts[user_id] = dataclasses.replace(pending[0], activation=code)
        return code

    async def activate(self, user_id: str, code_digest: str, now: datetime) -> User | None:
        pending = self._pending(user_id, now)
        if pending is None or pending[1].digest != code_digest:
            return None
        account = pending[0]
        user = dataclasses.replace(account.user, state=UserState.ACTIVE, updated_at=now)
        self.accounts[user_id] = dataclasses.replace(account, user=user, activation=None)
        return user

    async def activate_with_token(self, user_id: str, token_digest: str, now: datetime) -> User | None:
        account = self.accounts.get(user_id)
        if account is None or account.user.is_active or account.activation is None:
            return None
        activation = account.activation
        if activation.token_digest != token_digest:
            return None
        if activation.token_expires_at is None or activation.token_expires_at <= now:
            return None
        user = dataclasses.replace(account.user, state=UserState.ACTIVE, updated_at=now)
        self.accounts[user_id] = dataclasses.replace(account, user=user, activation=None)
        return user

    async def replace_activation_code(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        account = self.accounts.get(user_id)
        if account is None or account.user.is_active:
            return False
        counted = _counted_send(account.activation, code, max_sends, window_seconds)
        if counted is None:
            return False
        self.accounts[user_id] = dataclasses.replace(account, activation=counted)
        return True

    async def delete(self, user_id: str) -> bool:
        return self.accounts.pop(user_id, None) is not None

    async def delete_by_identifier(self, identifier_key_: str) -> bool:
        account = await self.find_account(identifier_key_)
        return account is not None and await self.delete(account.user.id)

    async def bump_token_version(self, user_id: str, now: datetime) -> None:
        account = self.accounts[user_id]
        user = dataclasses.replace(account.user, token_version=account.user.token_version + 1, updated_at=now)
        self.accounts[user_id] = dataclasses.replace(account, user=user, password_reset=None)

    async def change_state(
        self, user_id: str, *, from_states: frozenset[UserState], to: UserState, now: datetime
    ) -> User | None:
        account = self.accounts.get(user_id)
        if account is None or account.user.state not in from_states:
            return None
        user = dataclasses.replace(account.user, state=to, updated_at=now)
        self.accounts[user_id] = dataclasses.replace(account, user=user)
        return account.user

    async def set_role(self, user_id: str, role: Role, now: datetime) -> User | None:
        account = self.accounts.get(user_id)
        if account is None or account.user.role is role:
            return None
        self.accounts[user_id] = dataclasses.replace(
            account, user=dataclasses.replace(account.user, role=role, updated_at=now)
        )
        return account.user

    async def count_active_admins(self) -> int:
        return sum(account.user.is_active_admin for account in self.accounts.values())

    async def take_admin_check(self, holder: str, lease_seconds: float) -> bool:
        # One process: no lease runs out here, and a holder always releases.
        if self.admin_check_holder in (None, holder):
            self.admin_check_holder = holder
            return True
        return False

    async def release_admin_check(self, holder: str) -> None:
        if self.admin_check_holder == holder:
            self.admin_check_holder = None

    async def delete_unless_active_admin(self, user_id: str) -> bool:
        account = self.accounts.get(user_id)
        return account is not None and not account.user.is_active_admin and await self.delete(user_id)

    async def upgrade_password_hash(self, user_id: str, old_hash: str, new_hash: str) -> bool:
        account = self.accounts.get(user_id)
        if account is None or account.password_hash != old_hash or account.password_scheme is not PasswordScheme.BCRYPT:
            return False
        self.accounts[user_id] = dataclasses.replace(
            account, password_hash=new_hash, password_scheme=PasswordScheme.PEPPERED
        )
        return True


class FakeThrottleStore:
    """The tallies of :class:`~users_grpc.adapters.mongo.throttles.MongoThrottleStore`, with the same
    compare-and-set."""

    def __init__(self) -> None:
        self.tallies: dict[str, tuple[str, str, Tally]] = {}  # key: (account, kind, tally)

    async def get(self, keys: list[str]) -> dict[str, Tally]:
        return {key: self.tallies[key][2] for key in keys if key in self.tallies}

    async def count_failure(
        self,
        key: str,
        account: str,
        *,
        seen: Tally | None,
        below: int,
        now: datetime,
        window: timedelta,
        settles_by: datetime,
        expires_at: datetime,
    ) -> bool:
        current = self.tallies[key][2] if key in self.tallies else None
        fresh = Tally(count=1, last_at=now, pending=1, settles_by=settles_by)
        if seen is None or seen.last_at <= now - window:
            if current != seen:
                return False
            self.tallies[key] = (account, "password", fresh)
            return True
        if current is None or current.last_at <= now - window or (current.count >= below and current != seen):
            return False
        self.tallies[key] = (
            account,
            "password",
            Tally(
                count=current.count + 1,
                last_at=max(current.last_at, now),
                pending=current.pending + 1,
                settles_by=settles_by if current.settles_by is None else max(current.settles_by, settles_by),
            ),
        )
        return True

    async def settle_failure(self, key: str, now: datetime) -> None:
        current = self.tallies.get(key)
        if current and current[2].pending > 0:
            tally = current[2]
            settled = dataclasses.replace(tally, pending=tally.pending - 1, last_at=max(tally.last_at, now))
            self.tallies[key] = (current[0], current[1], settled)

    async def uncount_failure(self, key: str) -> None:
        current = self.tallies.get(key)
        if current and current[2].count > 0 and current[2].pending > 0:
            tally = current[2]
            self.tallies[key] = (
                current[0],
                current[1],
                dataclasses.replace(tally, count=tally.count - 1, pending=tally.pending - 1),
            )

    async def forget(self, key: str) -> None:
        self.tallies.pop(key, None)

    async def remember(self, key: str, account: str, now: datetime, expires_at: datetime) -> None:
        count = self.tallies[key][2].count if key in self.tallies else 0
        self.tallies[key] = (account, "known", Tally(count=count + 1, last_at=now))

    async def forget_account(self, account: str) -> None:
        for key, (owner, kind, _) in list(self.tallies.items()):
            if owner == account and kind == "password":
                del self.tallies[key]

    async def hit(self, key: str, expires_at: datetime) -> int:
        count = self.tallies[key][2].count + 1 if key in self.tallies else 1
        self.tallies[key] = ("", "rate", Tally(count=count, last_at=expires_at))
        return count


@dataclasses.dataclass
class FakeSessionRecord:
    session: Session
    generation: int
    token_digest: str
    revoked_at: datetime | None = None


class FakeSessionRepository:
    """The conditional updates of :class:`~users_grpc.adapters.mongo.sessions.MongoSessionRepository`."""

    def __init__(self) -> None:
        self.records: dict[str, FakeSessionRecord] = {}
        self._ids = (f"{n:024x}" for n in itertools.count(0x5E55_0000))

    def new_id(self) -> str:
        return next(self._ids)

    async def create(
        self, session_id: str, user_id: str, token_digest: str, now: datetime, expires_at: datetime, token_version: int
    ) -> Session:
        session = Session(
            id=session_id,
            user_id=user_id,
            created_at=now,
            last_used_at=now,
            expires_at=expires_at,
            token_version=token_version,
        )
        self.records[session_id] = FakeSessionRecord(session, 0, token_digest)
        return session

    async def rotate(
        self, session_id: str, generation: int, token_digest: str, new_token_digest: str, now: datetime
    ) -> Session | None:
        record = self.records.get(session_id)
        if (
            record is None
            or record.generation != generation
            or record.token_digest != token_digest
            or record.revoked_at is not None
            or record.session.expires_at <= now
        ):
            return None
        record.generation += 1
        record.token_digest = new_token_digest
        record.session = dataclasses.replace(record.session, last_used_at=now)
        return record.session

    async def revoke_replayed(self, session_id: str, generation: int, now: datetime) -> Session | None:
        record = self.records.get(session_id)
        if record is None or record.generation <= generation or record.revoked_at is not None:
            return None
        record.revoked_at = now
        return record.session

    async def revoke(self, session_id: str, now: datetime) -> None:
        record = self.records.get(session_id)
        if record is not None and record.revoked_at is None:
            record.revoked_at = now

    async def list_active(self, user_id: str, now: datetime) -> list[Session]:
        live = [
            r.session
            for r in self.records.values()
            if r.session.user_id == user_id and r.revoked_at is None and r.session.expires_at > now
        ]
        return sorted(live, key=lambda session: session.created_at, reverse=True)

    async def revoke_all(self, user_id: str, now: datetime) -> None:
        for record in self.records.values():
            if record.session.user_id == user_id and record.revoked_at is None:
                record.revoked_at = now


class FakeKeyStore:
    """The signing keys of :class:`~users_grpc.adapters.mongo.keys.MongoKeyStore`."""

    def __init__(self) -> None:
        self.keys: dict[str, StoredKey] = {}

    async def add(self, key: StoredKey) -> None:
        self.keys[key.kid] = key

    async def all(self) -> list[StoredKey]:
        return list(self.keys.values())

    async def retire(self, kid: str, now: datetime) -> bool:
        key = self.keys.get(kid)
        if key is None or key.retired_at is not None:
            return False
        self.keys[kid] = dataclasses.replace(key, retired_at=now)
        return True


class FakeCredentialRepository(FakeUserRepository):
    """The credential updates of :class:`~users_grpc.adapters.mongo.users.MongoUserRepository`: each one
    conditional, a change the user is told of pending its notice (``notices``) in the same step."""

    def __init__(self) -> None:
        super().__init__()
        self.notices: list[Mail] = []
        self.mfa_failures: dict[str, tuple[int, datetime | None]] = {}  # user id: (failures, window start)

    def _set(self, user_id: str, **changes: object) -> None:
        account = dataclasses.replace(self.accounts[user_id], **changes)  # type: ignore[arg-type]
        # As the repository reads it: a user has MFA on when an enrollment is active.
        mfa_enabled = account.mfa is not None and account.mfa.active
        self.accounts[user_id] = dataclasses.replace(
            account, user=dataclasses.replace(account.user, mfa_enabled=mfa_enabled)
        )

    def _changed(self, user_id: str, now: datetime, notice: Mail, **changes: object) -> None:
        """A change that ends every token so far (the version) and pends its notice."""
        user = self.accounts[user_id].user
        self._set(
            user_id, user=dataclasses.replace(user, token_version=user.token_version + 1, updated_at=now), **changes
        )
        self.notices.append(notice)

    async def replace_password_reset(
        self, user_id: str, code: ActivationCode, *, max_sends: int, window_seconds: int
    ) -> bool:
        account = self.accounts.get(user_id)
        if account is None or not account.user.is_active:
            return False
        counted = _counted_send(account.password_reset, code, max_sends, window_seconds)
        if counted is None:
            return False
        self._set(user_id, password_reset=counted)
        return True

    async def find_account_by_reset_digest(self, user_id: str, digest: str, now: datetime) -> Account | None:
        account = self.accounts.get(user_id)
        reset = account.password_reset if account else None
        if account is None or reset is None or reset.digest != digest or reset.expires_at <= now:
            return None
        return account if account.user.is_active else None

    async def reset_password(
        self,
        user_id: str,
        digest: str,
        password_hash: str,
        now: datetime,
        notice: Mail,
        *,
        history: PasswordHistory | None = None,
    ) -> bool:
        account = self.accounts.get(user_id)
        reset = account.password_reset if account else None
        if reset is None or reset.digest != digest or reset.expires_at <= now:
            return False
        return await self.set_password(user_id, password_hash, now, notice, history=history)

    async def set_password(
        self,
        user_id: str,
        password_hash: str,
        now: datetime,
        notice: Mail,
        *,
        history: PasswordHistory | None = None,
        change_required: bool = False,
    ) -> bool:
        if user_id not in self.accounts:
            return False
        if history is not None and self.accounts[user_id].password_hash != history.replaces:
            return False
        self._changed(
            user_id,
            now,
            notice,
            password_hash=password_hash,
            password_reset=None,
            password_scheme=PasswordScheme.PEPPERED,
        )
        return True

    async def start_mfa_enrollment(self, user_id: str, sealed_secret: bytes, now: datetime) -> bool:
        account = self.accounts.get(user_id)
        if account is None or (account.mfa is not None and account.mfa.active):
            return False
        self._set(
            user_id,
            mfa=Mfa(active=False, sealed_secret=sealed_secret, last_used_step=-1, recovery_digests=()),
            user=dataclasses.replace(account.user, updated_at=now),
        )
        self.mfa_failures[user_id] = (0, None)
        return True

    async def confirm_mfa(
        self, user_id: str, step: int, recovery_digests: list[str], now: datetime, notice: Mail
    ) -> bool:
        account = self.accounts.get(user_id)
        mfa = account.mfa if account else None
        if mfa is None or mfa.active or mfa.last_used_step >= step:
            return False
        active = dataclasses.replace(mfa, active=True, last_used_step=step, recovery_digests=tuple(recovery_digests))
        self._changed(user_id, now, notice, mfa=active)
        self.mfa_failures[user_id] = (0, self.mfa_failures.get(user_id, (0, None))[1])
        return True

    def _active_mfa(self, user_id: str) -> Mfa | None:
        account = self.accounts.get(user_id)
        return account.mfa if account and account.mfa and account.mfa.active else None

    async def use_totp_step(self, user_id: str, step: int) -> bool:
        mfa = self._active_mfa(user_id)
        if mfa is None or mfa.last_used_step >= step:
            return False
        self._set(user_id, mfa=dataclasses.replace(mfa, last_used_step=step))
        self.mfa_failures[user_id] = (0, self.mfa_failures.get(user_id, (0, None))[1])
        return True

    async def use_recovery_code(self, user_id: str, digest: str) -> bool:
        mfa = self._active_mfa(user_id)
        if mfa is None or digest not in mfa.recovery_digests:
            return False
        left = tuple(d for d in mfa.recovery_digests if d != digest)
        self._set(user_id, mfa=dataclasses.replace(mfa, recovery_digests=left))
        self.mfa_failures[user_id] = (0, self.mfa_failures.get(user_id, (0, None))[1])
        return True

    async def replace_recovery_codes(self, user_id: str, digests: list[str]) -> bool:
        mfa = self._active_mfa(user_id)
        if mfa is None:
            return False
        self._set(user_id, mfa=dataclasses.replace(mfa, recovery_digests=tuple(digests)))
        return True

    async def disable_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        if self._active_mfa(user_id) is None:
            return False
        self.mfa_failures.pop(user_id, None)
        self._changed(user_id, now, notice, mfa=None)
        return True

    async def reset_mfa(self, user_id: str, now: datetime, notice: Mail) -> bool:
        account = self.accounts.get(user_id)
        if account is None or account.mfa is None:
            return False
        self.mfa_failures.pop(user_id, None)
        self._changed(user_id, now, notice, mfa=None)
        return True

    async def reserve_mfa_attempt(self, user_id: str, now: datetime, *, max_attempts: int, window_seconds: int) -> bool:
        account = self.accounts.get(user_id)
        if account is None:
            return False
        failures, started = self.mfa_failures.get(user_id, (0, None))
        cutoff = now - timedelta(seconds=window_seconds)
        if started is not None and started > cutoff:
            if failures >= max_attempts:
                return False
            self.mfa_failures[user_id] = (failures + 1, started)
            return True
        if account.mfa is None:
            return False
        self.mfa_failures[user_id] = (1, now)
        return True


def _counted_send(
    old: ActivationCode | None, code: ActivationCode, max_sends: int, window_seconds: int
) -> ActivationCode | None:
    """``code`` counted as one more send in ``old``'s window while that lasts, as the real
    repository's ``_replace_code`` does; None once the window's sends are spent."""
    if old is None or old.window_started_at <= code.window_started_at - timedelta(seconds=window_seconds):
        return code
    if old.sends_in_window >= max_sends:
        return None
    return dataclasses.replace(code, sends_in_window=old.sends_in_window + 1, window_started_at=old.window_started_at)


class FakeServiceAccountTokens:
    """The token half of adapters/mongo/service_accounts.py: accounts by client id, each with its tokens."""

    def __init__(self) -> None:
        self.accounts: dict[str, ServiceAccount] = {}
        self.records: dict[str, dict[str, tuple[ServiceAccountToken, str]]] = {}
        self.uses = 0
        self._ids = itertools.count(1)

    def add_account(self, account: ServiceAccount) -> None:
        self.accounts[account.client_id] = account
        self.records[account.client_id] = {}

    def new_id(self) -> str:
        return f"{next(self._ids):024x}"

    async def add_token(self, token: ServiceAccountToken, digest: str, limit: int) -> bool:
        records = self.records.get(token.service_account_id)
        if records is None or len(records) >= limit:
            return False
        records[token.id] = (token, digest)
        return True

    async def get(self, client_id: str) -> ServiceAccount | None:
        return self.accounts.get(client_id)

    async def tokens(self, client_id: str) -> list[ServiceAccountToken] | None:
        records = self.records.get(client_id)
        return None if records is None else [token for token, _ in records.values()]

    async def token_holder(self, client_id: str, token_id: str) -> TokenHolder | None:
        account = self.accounts.get(client_id)
        if account is None:
            return None
        token, digest = self.records[client_id].get(token_id, (None, None))
        return TokenHolder(account=account, token=token, digest=digest)

    async def revoke_token(self, client_id: str, token_id: str) -> bool:
        return self.records.get(client_id, {}).pop(token_id, None) is not None

    async def record_token_use(self, client_id: str, token_id: str, now: datetime) -> None:
        self.uses += 1
        token, digest = self.records[client_id][token_id]
        self.records[client_id][token_id] = (dataclasses.replace(token, last_used_at=now), digest)
