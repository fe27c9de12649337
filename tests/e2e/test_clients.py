"""The client packages' examples, built and run against a live server: each signs in, reads the
user with the access token, verifies that token locally with its package's helper, and prints
the ErrorInfo reason of a refused call. Each from what users install (.ci/artifacts: the built
wheels, npm pack's tarball, the Go module's tagged files), each in an environment of its own. And
the Python client installs without the server, the server with its runtime dependencies only."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tomllib
import zipfile
from collections.abc import Callable
from email.parser import Parser
from importlib import metadata
from pathlib import Path

import pytest

import users
import users_grpc_client
from tests.support.builds import BUILD_TIMEOUT, built_once
from tests.support.calls import PASSWORD, create_request
from tests.support.mail import MailSink
from tests.support.paths import REPO_ROOT
from tests.support.servers import RunningServer
from users.v1 import error_reason_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc_client import InvalidToken, TokenVerifier

CLIENTS = REPO_ROOT / "clients"

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
    # Built by .ci/artifacts in a module of its own that requires the Go module's tagged files.
    artifacts: Path = request.getfixturevalue("artifacts")
    return run([str(artifacts / "go-client" / "quickstart"), server.address, name], tmp_path, server)


def ts_example(server: RunningServer, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    # The compiled example beside the npm pack tarball installed in a project of its own.
    artifacts: Path = request.getfixturevalue("artifacts")
    return run(["node", "quickstart.js", server.address, name], artifacts / "ts-client", server)


def python_example(server: RunningServer, name: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    # From a venv with the wheel of clients/python alone and its dependencies (.ci/artifacts);
    # -I: nothing of the work tree.
    artifacts: Path = request.getfixturevalue("artifacts")
    example = CLIENTS / "python" / "examples" / "quickstart.py"
    return run(
        [str(artifacts / "python-client" / "bin" / "python"), "-I", str(example), server.address, name],
        tmp_path,
        server,
    )


def build_artifacts(out: Path) -> None:
    done = subprocess.run(
        [str(REPO_ROOT / ".ci" / "artifacts"), str(out)], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What users install, built and installed each in an environment of its own by .ci/artifacts
    (or the directory CI_ARTIFACTS names, where it ran already), once for the session's workers."""
    if made := os.environ.get("CI_ARTIFACTS"):
        return Path(made)
    return built_once(tmp_path_factory, "artifacts", build_artifacts)


@pytest.fixture(scope="session")
def python_client_wheel(artifacts: Path) -> Path:
    (wheel,) = (artifacts / "dist").glob("users_grpc_client-*.whl")
    return wheel


@BUILD_TIMEOUT
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


@BUILD_TIMEOUT
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


@BUILD_TIMEOUT
def test_the_service_wheel_installs_with_its_runtime_dependencies_only_and_says_its_version(artifacts: Path) -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    service = artifacts / "service" / "bin"
    said = subprocess.run(
        [str(service / "users-grpc"), "--version"], capture_output=True, text=True, timeout=60, check=True
    )
    assert said.stdout == f"users-grpc {project['version']}\n"
    listed = subprocess.run(
        [
            str(service / "python"),
            "-I",
            "-c",
            "import importlib.metadata as m; print(*(d.name for d in m.distributions()))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    installed = {normalized(name) for name in listed.stdout.split()}
    development = {
        normalized(re.split(r"[\s<>=!~\[;]", line, maxsplit=1)[0]) for line in project["optional-dependencies"]["dev"]
    }
    assert {"users-grpc", "users-grpc-client", "grpcio", "pymongo"} <= installed
    assert not installed & development
    # The client by its version, as an index serves it, never the build machine's checkout path.
    (wheel,) = (artifacts / "dist").glob("users_grpc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        requires = Parser().parsestr(archive.read(metadata_name).decode()).get_all("Requires-Dist", [])
    assert f"users-grpc-client=={project['version']}" in requires


@BUILD_TIMEOUT
def test_every_module_of_the_service_imports_from_its_runtime_install(artifacts: Path, tmp_path: Path) -> None:
    # No dev tool (pytest, grpcio-tools, mypy...) is imported at run time: the wheel's dependencies suffice.
    every_module = (
        "import importlib, pkgutil, users_grpc; "
        "names = [m.name for m in pkgutil.walk_packages(users_grpc.__path__, 'users_grpc.')]; "
        "[importlib.import_module(name) for name in names]; print(len(names))"
    )
    done = subprocess.run(
        [str(artifacts / "service" / "bin" / "python"), "-I", "-c", every_module],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 20


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


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

    server.call(server.app.services.tokens.rotate())
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


# The Go module's path: a repository's on a VCS host, the module in its clients/go directory, so a
# module proxy serves it from the tag clients/go/vX.Y.Z (docs/releasing.md).
GO_MODULE = "github.com/users-grpc/users-grpc/clients/go"


def go(*args: str) -> str:
    """A go command in the Go module, from the module cache only (what .ci/setup filled)."""
    binary = shutil.which("go")
    assert binary, "Go is needed for the Go client's tests"
    env = {**os.environ, "GOFLAGS": "-mod=readonly", "GOPROXY": "off", "GOTOOLCHAIN": "local"}
    done = subprocess.run(
        [binary, *args], cwd=CLIENTS / "go", env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_go_module_has_a_path_a_proxy_can_fetch_and_its_code_and_example_vet_with_it() -> None:
    assert go("list", "-m").strip() == GO_MODULE
    # The generated stubs' go_package and every import (the example's too) use that path.
    packages = go("list", "./...").split()
    assert {f"{GO_MODULE}/users/v1", f"{GO_MODULE}/usersclient", f"{GO_MODULE}/examples/quickstart"} <= set(packages)
    go("vet", "./...")


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


@BUILD_TIMEOUT
def test_the_ts_verifier_caches_refetches_and_refuses_as_the_python_one(ts_build: Path) -> None:
    # Its own tests (clients/ts/test/verifier.test.ts), with keys of their own.
    done = subprocess.run(
        ["node", "--test", "dist/test/"], cwd=ts_build, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "# pass 2" in done.stdout
