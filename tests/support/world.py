"""What the unit test modules share: a service on fakes (``World``), a registration, and a runner."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any, TypeVar

from tests.support.fakes import FakeClock, FakeHasher, FakeMailer, FakeThrottleStore, FakeUserRepository
from users_grpc.adapters.mail_rendering import MailLinks, TemplateMailRenderer
from users_grpc.adapters.secrets_at_rest import SecretsAtRest
from users_grpc.domain.model import Gender, Registration, Role, User
from users_grpc.services.accounts import AccountPolicy, AccountService
from users_grpc.services.throttling import PasswordThrottle, ThrottlePolicy

_T = TypeVar("_T")
PASSWORD = "correct horse battery"


def run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    return asyncio.run(coroutine)


def registration(**changes: Any) -> Registration:
    fields: dict[str, Any] = {
        "username": "jane",
        "first_name": "Jane",
        "last_name": "Doe",
        "email": "jane@example.com",
        "password": PASSWORD,
        "password_confirmation": PASSWORD,
        "gender": Gender.FEMALE,
        "role": Role.USER,
    }
    fields.update(changes)
    if "password" in changes and "password_confirmation" not in changes:
        fields["password_confirmation"] = changes["password"]
    return Registration(**fields)


class World:
    def __init__(
        self,
        policy: AccountPolicy | None = None,
        throttle: ThrottlePolicy | None = None,
        users: FakeUserRepository | None = None,
    ) -> None:
        self.users = users or FakeUserRepository()
        self.mailer = FakeMailer()
        self.hasher = FakeHasher()
        self.clock = FakeClock()
        self.throttles = FakeThrottleStore()
        # The keyed digests of every secret the services store, shared by them as in the server.
        self.digests = SecretsAtRest(os.urandom(32))
        self.service = AccountService(
            users=self.users,
            mailer=self.mailer,
            mail_renderer=TemplateMailRenderer(override_dir=None, default_language="en", links=MailLinks()),
            hasher=self.hasher,
            digests=self.digests,
            clock=self.clock,
            # No reply floor unless a test asks for one: test_accounts.py checks the floor itself.
            policy=policy or AccountPolicy(reply_floor=timedelta(0)),
            throttle=PasswordThrottle(store=self.throttles, clock=self.clock, policy=throttle or ThrottlePolicy()),
        )

    def last_token(self) -> str:
        match = re.search(r"hours:\s+(\S+)", self.mailer.sent[-1].body)
        assert match, self.mailer.sent[-1].body
        return match.group(1)

    def last_code(self) -> str:
        match = re.search(r"code is (\d{6})", self.mailer.sent[-1].body)
        assert match, self.mailer.sent[-1].body
        return match.group(1)

    def create(self, **changes: Any) -> User:
        return run(self.service.create_user(registration(**changes)))
