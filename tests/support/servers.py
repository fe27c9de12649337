"""Real servers for the tests: the service built by bootstrap on port 0, its asyncio loop in a
thread, called through real channels as an admin made for it or with no credentials."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import sys
import threading
import uuid
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

import grpc
import pytest
from pymongo.monitoring import CommandListener, ConnectionPoolListener

from tests.support.commands import FILTERING, CommandRecorder
from tests.support.mail import MailSink
from users.v1 import user_service_pb2, user_service_pb2_grpc
from users_grpc.bootstrap import App, build_app
from users_grpc.config import Settings
from users_grpc.domain.model import Gender, Registration, Role
from users_grpc.domain.ports import Clock

_T = TypeVar("_T")

ADMIN_PASSWORD = "admin password for tests"
KEY_ENCRYPTION_KEY = os.urandom(32)


class BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds ``authorization: Bearer <token>`` to every call of a channel."""

    def __init__(self, token: str) -> None:
        self.token = token

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        metadata = [*(details.metadata or []), ("authorization", f"Bearer {self.token}")]
        return continuation(details._replace(metadata=metadata), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return self.intercept_unary_unary(continuation, details, request)


class RunningServer:
    """A real server on port 0, its asyncio loop in a thread, and channels to it.

    ``stub`` calls as an admin (made for this server), ``anonymous`` with no credentials.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Clock | None,
        credentials: grpc.ChannelCredentials | None = None,
        tracer_provider: Any = None,
        event_listeners: Sequence[CommandListener | ConnectionPoolListener] = (),
    ) -> None:
        self.settings = settings
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="server-loop", daemon=True)
        self._thread.start()
        self.app: App = self.call(
            build_app(settings, clock=clock, tracer_provider=tracer_provider, event_listeners=event_listeners)
        )
        self.call(self.app.start())
        self.address = f"127.0.0.1:{self.app.port}"
        self.channel = (
            grpc.insecure_channel(self.address)
            if credentials is None
            else grpc.secure_channel(self.address, credentials)
        )
        self.anonymous = user_service_pb2_grpc.UserServiceStub(self.channel)
        self.admin_username = admin = f"admin-{uuid.uuid4().hex[:8]}"
        self.call(self.app.services.accounts.create_admin(registration(username=admin, email=f"{admin}@example.com")))
        signed_in = self.anonymous.Authenticate(
            user_service_pb2.AuthenticateRequest(identifier=admin, password=ADMIN_PASSWORD)
        )
        self.admin_token, self.admin_id = signed_in.access_token, signed_in.user.id
        self.stub = self.stub_for(self.admin_token)

    def stub_for(self, access_token: str) -> user_service_pb2_grpc.UserServiceStub:
        """A stub that calls with this access token."""
        return user_service_pb2_grpc.UserServiceStub(grpc.intercept_channel(self.channel, BearerToken(access_token)))

    def call(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 60) -> _T:
        """Run ``coroutine`` on the server's loop and wait for its result."""
        return self.submit(coroutine).result(timeout)

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        """Start ``coroutine`` on the server's loop, for a test to watch while it runs."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def stop(self) -> None:
        if self._loop.is_closed():  # stopped by the test already
            return
        self.channel.close()
        try:
            self.call(self.app.stop(), timeout=30)
        except TimeoutError:
            # Show where the server is stuck before failing the test.
            for task in asyncio.all_tasks(self._loop):
                task.print_stack(file=sys.stderr)
            raise
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


def registration(*, username: str, email: str, password: str = ADMIN_PASSWORD) -> Registration:
    return Registration(
        username=username,
        first_name="Ada",
        last_name="Admin",
        email=email,
        password=password,
        password_confirmation=password,
        gender=Gender.UNSPECIFIED,
        role=Role.ADMIN,
    )


def make_settings(mongodb_uri: str, database_name: str, smtp_port: int) -> Settings:
    """Settings for a test server: port 0, fast polling, bcrypt at its least cost (4).

    A server start hashes three times and each sign-in once: at the production floor (10) that was
    a large part of the suite's CPU. A test whose meaning rests on the cost (timing, the costs an
    import takes, the stored hash) starts its server with ``bcrypt_rounds=MIN_BCRYPT_ROUNDS``.
    """
    return Settings(
        grpc_address="127.0.0.1:0",
        mongodb_uri=mongodb_uri,
        mongodb_database=database_name,
        # Far above a stall of the shared harness on a loaded machine (an fsync, say), which would
        # fail whatever test was calling; the tests of the timeout set their own.
        db_timeout_seconds=10.0,
        health_interval_seconds=0.2,
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        smtp_security="none",
        smtp_timeout_seconds=2.0,
        mail_poll_seconds=0.2,
        bcrypt_rounds=4,
        insecure_bcrypt_for_tests=True,  # the test-only way below MIN_BCRYPT_ROUNDS (config.py)
        hash_workers=2,
        hash_queue_length=64,  # tests race twenty registrations at once
        # The suite calls from one address far more often than any person would.
        rate_limit_requests=1_000_000,
        shutdown_grace_seconds=2.0,
        key_encryption_key=KEY_ENCRYPTION_KEY,
        # Passkeys on, for the software authenticator of tests/support/authenticator.py.
        webauthn_rp_id="localhost",
        webauthn_rp_name="users-grpc tests",
        webauthn_origins=("http://localhost:8080",),
    )


StartServer = Callable[..., RunningServer]


@pytest.fixture(scope="session")
def suite_queries() -> CommandRecorder:
    """Every filtering command (and index creation) any test's server sends: the last test of the
    session checks each was served by an index (tests/e2e/test_query_indexes.py)."""
    return CommandRecorder(FILTERING | {"createIndexes"})


@pytest.fixture
def start_server(
    mongodb_uri: str, database_name: str, smtp_server: tuple[MailSink, int], suite_queries: CommandRecorder
) -> Iterator[StartServer]:
    """Start servers with test settings (changed by keyword) and stop them after the test."""
    servers: list[RunningServer] = []

    def start(
        *,
        clock: Clock | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        tracer_provider: Any = None,
        event_listeners: Sequence[CommandListener | ConnectionPoolListener] = (),
        **changes: Any,
    ) -> RunningServer:
        settings = dataclasses.replace(make_settings(mongodb_uri, database_name, smtp_server[1]), **changes)
        servers.append(RunningServer(settings, clock, credentials, tracer_provider, [suite_queries, *event_listeners]))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def server(start_server: StartServer) -> RunningServer:
    return start_server()
