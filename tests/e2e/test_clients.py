"""The client packages' examples, built and run against a live server: each signs in, reads the
user with the access token, verifies that token locally with its package's helper, and prints
the ErrorInfo reason of a refused call. And the Python client installs without the server."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

import users
import users_grpc_client
from tests.support.calls import PASSWORD, create_request
from tests.support.mail import MailSink
from tests.support.paths import REPO_ROOT
from tests.support.servers import RunningServer
from users.v1 import error_reason_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc_client import InvalidToken, TokenVerifier

CLIENTS = REPO_ROOT / "clients"
NODE_MODULES = REPO_ROOT / ".tools" / "node_modules"

# (server, user name, a scratch directory, the test's request for built packages) -> what it printed
Example = Callable[[RunningServer, str, Path, pytest.FixtureRequest], str]


def active_user(server: RunningServer, mail: MailSink, name: str) -> str:
    """A signed-up, activated user; returns its id."""
    email = f"{name}@example.com"
    created = server.anonymous.CreateUser(create_request(username=name, email=email))
    server.anonymous.ActivateUser(pb.ActivateUserRequest(identifier=name, code=mail.code_for(email)))
    return str(created.user.id)


def run(command: list[str], cwd: Path, server: RunningServer, timeout: float = 300) -> str:
    env = {
        **os.environ,
        "EXAMPLE_PASSWORD": PASSWORD,
        "EXAMPLE_ISSUER": server.settings.jwt_issuer,
        "EXAMPLE_AUDIENCE": server.settings.jwt_audience,
    }
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def go_example(server: RunningServer, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    go = shutil.which("go")
    assert go, "Go is needed for the Go client's example"
    # -mod=readonly: go.mod and go.sum are complete, nothing is resolved anew; the modules are in
    # the module cache and the package's dependencies in the build cache (.ci/setup).
    return run([go, "run", "-mod=readonly", "./examples/quickstart", server.address, name], CLIENTS / "go", server)


def ts_example(server: RunningServer, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    package: Path = request.getfixturevalue("ts_client_build")
    return run(["node", "dist/examples/quickstart.js", server.address, name], package, server)


@pytest.fixture(scope="module")
def ts_client_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """clients/ts compiled once (package, example and tests), in a copy beside the modules
    .ci/setup installed, so the work tree stays clean."""
    package = tmp_path_factory.mktemp("ts-client") / "ts"
    shutil.copytree(CLIENTS / "ts", package, ignore=shutil.ignore_patterns("node_modules", "dist"))
    (package / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)
    done = subprocess.run(
        [str(NODE_MODULES / ".bin" / "tsc"), "-p", "."], cwd=package, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return package


def python_example(server: RunningServer, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    # From the wheel of clients/python alone (its users package included), not the server's.
    wheel: Path = request.getfixturevalue("python_client_wheel")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    example = CLIENTS / "python" / "examples" / "quickstart.py"
    command = [sys.executable, "-I", "-c", _ISOLATED.format(site=str(unpacked), example=str(example))]
    return run([*command, server.address, name], tmp_path, server)


# -I drops PYTHONPATH and the work tree; the venv's site-packages (grpcio, PyJWT...) stay, and the
# unpacked wheel goes first, so `users` and `users_grpc_client` come from the wheel.
_ISOLATED = (
    "import runpy, sys; sys.path.insert(0, {site!r}); sys.argv = [{example!r}, *sys.argv[1:]]; "
    "import users; assert users.__file__.startswith({site!r}), users.__file__; "
    "runpy.run_path({example!r}, run_name='__main__')"
)


@pytest.fixture(scope="module")
def python_client_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of clients/python, built once."""
    # A copy: src/users is a link to generated/users, which the copy resolves, and the build
    # leaves its build/ and egg-info there rather than in the work tree.
    tmp_path = tmp_path_factory.mktemp("python-client")
    source = tmp_path / "source"
    shutil.copytree(CLIENTS / "python", source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    out = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out), "."],
        cwd=source,
        check=True,
        timeout=300,
        capture_output=True,
    )
    (wheel,) = out.glob("users_grpc_client-*.whl")
    return wheel


@pytest.mark.parametrize("example", [go_example, ts_example, python_example], ids=["go", "ts", "python"])
def test_each_client_example_signs_in_verifies_locally_and_reads_a_refusal_reason(
    server: RunningServer, mail: MailSink, tmp_path: Path, request: pytest.FixtureRequest, example: Example
) -> None:
    name = f"client-{example.__name__.split('_')[0]}"
    user_id = active_user(server, mail, name)
    lines = example(server, name, tmp_path, request).splitlines()
    assert lines[0] == f"signed in as {name} ({user_id})"
    assert lines[1] == f"GetUser: {name} <{name}@example.com>"
    assert lines[2].startswith(f"verified locally: sub={user_id} role=user sid=")
    assert len(lines[2].rsplit("sid=", 1)[1]) == 24
    assert lines[3].startswith("refused: code=")
    reason = lines[3].rsplit("reason=", 1)[1]
    assert reason == "PERMISSION_DENIED"
    assert error_reason_pb2.ErrorReason.Value("ERROR_REASON_" + reason)


def test_the_server_takes_its_stubs_from_the_client_package() -> None:
    """One copy of the stubs: the server depends on clients/python, by this checkout's path (never
    by name from an index), and the users.v1 it imports is that package's."""
    client = CLIENTS / "python"
    assert f"users-grpc-client @ {client.resolve().as_uri()}" in (metadata.requires("users-grpc") or [])
    assert Path(users.__file__).parent == client / "src" / "users"


def test_the_python_client_needs_nothing_of_the_server(python_client_wheel: Path) -> None:
    with zipfile.ZipFile(python_client_wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert {
        "users/v1/user_service_pb2.py",
        "users/v1/user_service_pb2_grpc.pyi",
        "users_grpc_client/__init__.py",
    } <= names
    assert not any(name.startswith("users_grpc/") for name in names)
    requires = {re.split(r"[\s<>=!~\[;]", line, maxsplit=1)[0] for line in metadata.get_all("Requires-Dist", [])}
    assert requires == {"googleapis-common-protos", "grpcio", "grpcio-status", "protobuf", "pyjwt"}


class CountingKeys:
    """The server's GetPublicKeys, counted."""

    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.fetches = 0

    def GetPublicKeys(self, request: pb.GetPublicKeysRequest) -> pb.GetPublicKeysResponse:
        self.fetches += 1
        return self.server.anonymous.GetPublicKeys(request)


def sign_in(server: RunningServer, name: str) -> pb.AuthenticateResponse:
    return server.anonymous.Authenticate(pb.AuthenticateRequest(identifier=name, password=PASSWORD))


def test_the_python_verifier_caches_the_keys_and_fetches_them_again_after_a_rotation(
    server: RunningServer, mail: MailSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    user_id = active_user(server, mail, "rotated")
    keys = CountingKeys(server)
    verifier = TokenVerifier(keys, issuer=server.settings.jwt_issuer, audience=server.settings.jwt_audience)
    first = sign_in(server, "rotated")
    claims = verifier.verify(first.access_token)
    assert (claims.subject, claims.role, claims.session_id) == (user_id, "user", first.session_id)
    verifier.verify(sign_in(server, "rotated").access_token)
    assert keys.fetches == 1

    server.call(server.app.tokens.rotate())
    rotated = sign_in(server, "rotated").access_token
    # Within the refetch interval an unknown kid is refused without asking the server again.
    monkeypatch.setattr(users_grpc_client, "REFETCH_INTERVAL_SECONDS", 3600.0)
    with pytest.raises(InvalidToken, match="unknown key"):
        verifier.verify(rotated)
    assert keys.fetches == 1
    monkeypatch.setattr(users_grpc_client, "REFETCH_INTERVAL_SECONDS", 0.0)
    assert verifier.verify(rotated).subject == user_id
    assert keys.fetches == 2
    # The old key still verifies (until retired), from the refreshed set.
    assert verifier.verify(first.access_token).subject == user_id


def test_the_python_verifier_refuses_other_audiences_and_forged_tokens(server: RunningServer, mail: MailSink) -> None:
    active_user(server, mail, "pinned")
    token = sign_in(server, "pinned").access_token
    other = TokenVerifier(server.anonymous, issuer=server.settings.jwt_issuer, audience="another-service")
    with pytest.raises(InvalidToken, match=r"(?i)audience"):
        other.verify(token)
    verifier = TokenVerifier(server.anonymous, issuer=server.settings.jwt_issuer, audience=server.settings.jwt_audience)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["role"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken, match=r"(?i)signature"):
        verifier.verify(f"{header}.{forged}.{signature}")
    with pytest.raises(InvalidToken, match="malformed"):
        verifier.verify("not a token")


def test_the_go_verifier_caches_refetches_and_refuses_as_the_python_one() -> None:
    # Its own tests (clients/go/usersclient/verifier_test.go), with keys of their own: a rotation
    # fetches the set again, at most once per interval; other audiences, issuers, roles and
    # algorithms are refused.
    go = shutil.which("go")
    assert go, "Go is needed for the Go client's tests"
    done = subprocess.run(
        [go, "test", "-mod=readonly", "-count=1", "./usersclient"],
        cwd=CLIENTS / "go",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_ts_verifier_caches_refetches_and_refuses_as_the_python_one(ts_client_build: Path) -> None:
    # Its own tests (clients/ts/test/verifier.test.ts), with keys of their own.
    done = subprocess.run(
        ["node", "--test", "dist/test/"], cwd=ts_client_build, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# pass 2" in done.stdout
