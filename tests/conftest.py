"""Real components for the tests: FerretDB (our dbharness), an SMTP server, the gRPC server.

Set USERS_TEST_MONGODB_URI to run the same tests against a real MongoDB instead.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email
import email.policy
import gc
import os
import re
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Coroutine, Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from aiosmtpd.controller import Controller
from pymongo.monitoring import CommandListener, ConnectionPoolListener

from tests.commands import FILTERING, CommandRecorder
from tests.pki import Pki, make_pki
from users.v1 import user_service_pb2, user_service_pb2_grpc
from users_grpc.bootstrap import App, build_app
from users_grpc.config import Settings
from users_grpc.devdb import DevDatabase, start_dev_database
from users_grpc.domain import Gender, Registration, Role
from users_grpc.logs import CallerContext
from users_grpc.ports import Clock

REPO_ROOT = Path(__file__).resolve().parent.parent
HARNESS = Path(os.environ.get("USERS_DEV_DB_BINARY", REPO_ROOT / "dbharness/bin/dbharness"))
_T = TypeVar("_T")


def collect_known_leaks() -> None:
    """Collect sockets a third-party component is known to leave open, here, where the cause is
    known, rather than let their ResourceWarning fail whichever test the garbage collector hits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def start_ferretdb(data_dir: Path) -> DevDatabase:
    return start_dev_database(data_dir=data_dir, binary=HARNESS)


@pytest.fixture
def own_database(tmp_path: Path) -> Iterator[DevDatabase]:
    """A FerretDB process of this test's own, to pause (SIGSTOP), resume or kill."""
    database = start_ferretdb(tmp_path / "db")
    yield database
    if database.process.poll() is None:
        os.kill(database.process.pid, signal.SIGCONT)
    database.stop()


@pytest.fixture(scope="session")
def mongodb_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    external = os.environ.get("USERS_TEST_MONGODB_URI")
    if external:
        yield external
        return
    database = start_ferretdb(tmp_path_factory.mktemp("ferretdb"))
    yield database.uri
    database.stop()


@pytest.fixture
def database_name() -> str:
    """A fresh database for each test, so tests never see each other's data."""
    return f"test_{uuid.uuid4().hex[:16]}"


def free_port() -> int:
    """A port that was free a moment ago. Racy (another process may bind it before the caller
    does): prefer :func:`bound_socket`, or binding port 0 and reading the port back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bound_socket() -> socket.socket:
    """A TCP socket bound to a port of its own on 127.0.0.1, not listening: connections to it are
    refused (a dead server) until it is handed to :class:`SocketController`, which listens on it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def codes_other_than(*accepted: str, count: int = 1) -> list[str]:
    """``count`` six-digit codes, none of them in ``accepted``: a fixed wrong guess such as
    "000000" is a random code's value once in a million, and the suite guesses hundreds of times."""
    return [code for code in (f"{n:06d}" for n in range(count + len(accepted))) if code not in accepted][:count]


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


class SocketController(Controller):
    """An aiosmtpd controller listening on a socket bound already (port 0, read back), so no port
    is ever released and bound again, where another process could take it in between."""

    def __init__(self, handler: Any, sock: socket.socket | None = None, **kwargs: Any) -> None:
        self.socket = sock if sock is not None else bound_socket()
        super().__init__(handler, hostname="127.0.0.1", port=port_of(self.socket), **kwargs)

    def _create_server(self) -> Any:
        return self.loop.create_server(self._factory_invoker, sock=self.socket, ssl=self.ssl_context)


class MailSink:
    """An aiosmtpd handler that keeps what it receives, for tests to wait on."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        # Each message as it came over the wire, for what a person or grep would see.
        self.raw: list[bytes] = []
        # The SMTP envelope's recipients (RCPT TO) of each message, in the same order.
        self.envelope_recipients: list[list[str]] = []
        self._changed = threading.Condition()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        with self._changed:
            self.messages.append(message)
            self.raw.append(envelope.content)
            self.envelope_recipients.append(list(envelope.rcpt_tos))
            self._changed.notify_all()
        return "250 OK"

    def clear(self) -> None:
        with self._changed:
            self.messages.clear()
            self.raw.clear()
            self.envelope_recipients.clear()

    def recipients_of(self, message: EmailMessage) -> list[str]:
        """The envelope recipients ``message`` was delivered to."""
        with self._changed:
            return next(rcpt for m, rcpt in zip(self.messages, self.envelope_recipients, strict=True) if m is message)

    def wait_for(self, to: str, count: int = 1, timeout: float = 10.0) -> list[EmailMessage]:
        """The first ``count`` messages to ``to``, waiting for them to arrive."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matching = [m for m in self.messages if m["To"] == to]
                if len(matching) >= count:
                    return matching[:count]
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{count} mail(s) to {to} not received; got {len(matching)}")
                self._changed.wait(remaining)

    def activation_token_for(self, to: str, nth: int = 1) -> str:
        """The long activation token of the ``nth`` mail to ``to`` (the line after "expires in N hours:")."""
        body = self.wait_for(to, nth)[nth - 1].get_content()
        match = re.search(r"expires in \d+ hours:\s+(\S+)", body)
        assert match, body
        return match.group(1)

    def code_for(self, to: str, nth: int = 1) -> str:
        body = self.wait_for(to, nth)[nth - 1].get_content()
        match = re.search(r"code is (\d{6})", body)
        assert match, body
        return match.group(1)


@pytest.fixture(scope="session")
def smtp_server() -> Iterator[tuple[MailSink, int]]:
    sink = MailSink()
    controller = SocketController(sink)
    controller.start()
    yield sink, controller.port
    controller.stop()


@pytest.fixture
def dead_smtp_port() -> Iterator[int]:
    """A port where no SMTP server answers (connections are refused), held for the test."""
    with bound_socket() as sock:
        yield port_of(sock)


@pytest.fixture
def mail(smtp_server: tuple[MailSink, int]) -> MailSink:
    sink, _ = smtp_server
    sink.clear()
    return sink


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
        self.call(self.app.accounts.create_admin(registration(username=admin, email=f"{admin}@example.com")))
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
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

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
    """Settings for a test server: port 0, fast polling, the cheapest bcrypt cost allowed."""
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
        bcrypt_rounds=10,
        hash_workers=2,
        hash_queue_length=64,  # tests race twenty registrations at once
        # The suite calls from one address far more often than any person would.
        rate_limit_requests=1_000_000,
        shutdown_grace_seconds=2.0,
        key_encryption_key=KEY_ENCRYPTION_KEY,
    )


StartServer = Callable[..., RunningServer]


@pytest.fixture(scope="session")
def suite_queries() -> CommandRecorder:
    """Every filtering command (and index creation) any test's server sends: the last test of the
    session checks each was served by an index (tests/e2e/test_query_indexes.py)."""
    return CommandRecorder(FILTERING | {"createIndexes"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The check of every query the suite sent runs once the rest of the suite has sent them.
    last = [item for item in items if item.get_closest_marker("after_the_suite")]
    items[:] = [item for item in items if item not in last] + last


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "after_the_suite: run after every other test of the session")


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


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for TLS and mTLS servers and their clients (tests/pki.py), one set per module."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def caplog(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """pytest's caplog, its records enriched with the caller as the service's own log handler does."""
    caller_context = CallerContext()
    handler = caplog.handler  # pytest's one capturing handler, shared by every test phase
    handler.addFilter(caller_context)
    yield caplog
    handler.removeFilter(caller_context)
