"""What admins do to other accounts: roles, deactivation and locking, and resetting MFA.

Every change is one conditional update on the user; one that takes away an active
admin keeps at least one (:func:`users_grpc.services.last_admin.keep_an_active_admin`). Once
it stands, the user's token version moves and their sessions are revoked, so
the change applies to everything they hold at once.
"""

from __future__ import annotations

import logging

from users_grpc.domain import rules
from users_grpc.domain.errors import NotFound, WrongUserState
from users_grpc.domain.model import Role, User, UserState
from users_grpc.domain.ports import Clock, SessionRepository, UserRepository
from users_grpc.services.last_admin import keep_an_active_admin
from users_grpc.services.mfa import MfaService
from users_grpc.services.throttling import PasswordThrottle

log = logging.getLogger(__name__)

_ACTIVE = frozenset({UserState.ACTIVE})


class AdminService:
    def __init__(
        self,
        *,
        users: UserRepository,
        sessions: SessionRepository,
        throttle: PasswordThrottle,
        mfa: MfaService,
        clock: Clock,
    ) -> None:
        self._users = users
        self._sessions = sessions
        self._throttle = throttle
        self._mfa = mfa
        self._clock = clock

    async def set_role(self, user_id: str, role: Role) -> User:
        rules.validate_user_id(user_id, "user_id")
        now = self._clock.now()
        before = await self._users.set_role(user_id, role, now)
        if before is None:
            return await self._get(user_id)  # no such user, or the role is theirs already
        if role is not Role.ADMIN:
            await keep_an_active_admin(
                self._users, before, undo=lambda: self._users.set_role(user_id, before.role, now)
            )
        await self._end_tokens(user_id)
        log.info("user role changed", extra={"user_id": user_id, "from_role": before.role.value, "to_role": role.value})
        return await self._get(user_id)

    async def deactivate(self, user_id: str) -> User:
        return await self._move(user_id, frozenset({UserState.ACTIVE, UserState.LOCKED}), UserState.DEACTIVATED)

    async def reactivate(self, user_id: str) -> User:
        return await self._move(user_id, frozenset({UserState.DEACTIVATED}), UserState.ACTIVE)

    async def lock(self, user_id: str) -> User:
        return await self._move(user_id, _ACTIVE, UserState.LOCKED)

    async def unlock(self, user_id: str) -> User:
        user = await self._move(user_id, frozenset({UserState.LOCKED}), UserState.ACTIVE)
        # Whatever a guesser counted against the account would otherwise still hold the owner back.
        await self._throttle.forget_account(user_id)
        log.info("password failures forgotten", extra={"user_id": user_id})
        return user

    async def reset_mfa(self, user_id: str) -> User:
        user = await self._mfa.reset(user_id)
        log.info("user mfa reset", extra={"user_id": user_id})
        return user

    async def _move(self, user_id: str, from_states: frozenset[UserState], to: UserState) -> User:
        """Move the user from one of ``from_states`` to ``to``; a user in ``to`` already stays as is."""
        rules.validate_user_id(user_id, "user_id")
        now = self._clock.now()
        before = await self._users.change_state(user_id, from_states=from_states, to=to, now=now)
        if before is None:
            user = await self._get(user_id)
            if user.state is to:
                return user
            raise WrongUserState(f"not possible for a user in state {_STATE_NAMES[user.state]}")
        if to is not UserState.ACTIVE:
            await keep_an_active_admin(
                self._users,
                before,
                undo=lambda: self._users.change_state(user_id, from_states=frozenset({to}), to=before.state, now=now),
            )
        await self._end_tokens(user_id)
        log.info(
            "user state changed", extra={"user_id": user_id, "from_state": before.state.value, "to_state": to.value}
        )
        return await self._get(user_id)

    async def _end_tokens(self, user_id: str) -> None:
        now = self._clock.now()
        await self._users.bump_token_version(user_id, now)
        await self._sessions.revoke_all(user_id, now)

    async def _get(self, user_id: str) -> User:
        user = await self._users.get(user_id)
        if user is None:
            raise NotFound()
        return user


# As the contract names them.
_STATE_NAMES = {state: f"USER_STATE_{state.name}" for state in UserState}
