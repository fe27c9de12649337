"""The operator's commands, run as processes against the database a server uses."""

from __future__ import annotations

import base64
import os

import jwt

from tests.support.calls import users_grpc, wait_until
from tests.support.servers import StartServer
from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb


def test_create_admin_makes_an_active_admin_who_can_sign_in(start_server: StartServer) -> None:
    server = start_server()
    password = "operator passphrase 42"
    result = users_grpc(
        "create-admin", "--username", "root", "--email", "root@example.com",
        server_settings=server.settings, USERS_ADMIN_PASSWORD=password,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="root", password=password))
    assert signed_in.user.role == user_pb2.ROLE_ADMIN
    assert signed_in.user.is_active
    again = users_grpc(
        "create-admin", "--username", "root", "--email", "x@example.com",
        server_settings=server.settings, USERS_ADMIN_PASSWORD=password,
    )  # fmt: skip
    assert again.returncode == 1
    assert "username is already taken" in again.stderr


def test_create_admin_puts_the_grant_on_the_audit_trail(start_server: StartServer) -> None:
    server = start_server()
    password = "operator passphrase 42"
    made = users_grpc(
        "create-admin", "--username", "root", "--email", "root@example.com",
        server_settings=server.settings, USERS_ADMIN_PASSWORD=password,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    signed_in = server.anonymous.Authenticate(pb.AuthenticateRequest(identifier="root", password=password))
    token = (("authorization", f"Bearer {signed_in.access_token}"),)
    events = server.anonymous.ListAuditEvents(
        pb.ListAuditEventsRequest(types=[pb.AUDIT_EVENT_TYPE_ROLE_CHANGE]), metadata=token
    ).audit_events
    assert [(e.subject_id, e.actor.kind, e.actor.id, e.note) for e in events] == [
        (signed_in.user.id, pb.AUDIT_ACTOR_KIND_OPERATOR, "create-admin", "role ROLE_ADMIN, at creation")
    ]


def test_keys_rotate_is_picked_up_by_a_running_server(start_server: StartServer) -> None:
    server = start_server(key_reload_seconds=0.2)
    old_kid = jwt.get_unverified_header(server.admin_token)["kid"]
    result = users_grpc("keys", "rotate", server_settings=server.settings)
    assert result.returncode == 0, result.stderr
    new_kid = result.stdout.strip()

    def signs_with_new_key() -> bool:
        request = pb.AuthenticateRequest(identifier=server.admin_username, password="admin password for tests")
        kid: str = jwt.get_unverified_header(server.anonymous.Authenticate(request).access_token)["kid"]
        return kid == new_kid

    wait_until(signs_with_new_key, what="the rotated key")
    assert new_kid != old_kid
    refused = users_grpc("keys", "retire", new_kid, server_settings=server.settings)
    assert refused.returncode == 2
    assert "is the key that signs now" in refused.stderr
    retired = users_grpc("keys", "retire", old_kid, server_settings=server.settings)
    assert retired.returncode == 0, retired.stderr


def test_missing_key_encryption_key_is_a_clear_configuration_error(start_server: StartServer) -> None:
    server = start_server()
    result = users_grpc("keys", "rotate", server_settings=server.settings, USERS_KEY_ENCRYPTION_KEY="")
    assert result.returncode == 2
    assert "USERS_KEY_ENCRYPTION_KEY is required" in result.stderr


def test_a_wrong_key_encryption_key_is_one_clear_sentence(start_server: StartServer) -> None:
    server = start_server()
    wrong = base64.urlsafe_b64encode(os.urandom(32)).decode()
    for command in (["keys", "rotate"], ["create-admin", "--username", "root2", "--email", "root2@example.com"]):
        result = users_grpc(
            *command, server_settings=server.settings, USERS_KEY_ENCRYPTION_KEY=wrong, USERS_ADMIN_PASSWORD="x" * 20
        )
        assert result.returncode == 2, result.stderr
        assert "USERS_KEY_ENCRYPTION_KEY does not open the signing keys" in result.stderr
        assert "Traceback" not in result.stderr


def test_missing_key_encryption_key_points_at_the_dev_key_file(start_server: StartServer) -> None:
    server = start_server()
    result = users_grpc(
        "create-admin",
        "--username",
        "x",
        "--email",
        "x@example.com",
        server_settings=server.settings,
        USERS_KEY_ENCRYPTION_KEY="",
    )
    assert result.returncode == 2
    assert "var/key-encryption-key" in result.stderr


def test_operator_commands_run_beside_a_server_on_the_same_address(start_server: StartServer) -> None:
    """create-admin and keys rotate serve nothing: they never bind the server's address."""
    server = start_server()
    result = users_grpc("keys", "rotate", server_settings=server.settings, USERS_GRPC_ADDRESS=server.address)
    assert result.returncode == 0, result.stderr


def test_create_admin_takes_the_names_and_says_so_when_it_makes_them_up(start_server: StartServer) -> None:
    server = start_server()
    named = users_grpc(
        "create-admin", "--username", "ada", "--email", "ada@example.com",
        "--first-name", "Ada", "--last-name", "Lovelace",
        server_settings=server.settings, USERS_ADMIN_PASSWORD="operator passphrase 42",
    )  # fmt: skip
    assert named.returncode == 0, named.stderr
    assert "named" not in named.stderr
    ada = server.stub.GetUserByIdentifier(pb.GetUserByIdentifierRequest(identifier="ada")).user
    assert (ada.first_name, ada.last_name) == ("Ada", "Lovelace")
    unnamed = users_grpc(
        "create-admin", "--username", "root", "--email", "root@example.com",
        server_settings=server.settings, USERS_ADMIN_PASSWORD="operator passphrase 42",
    )  # fmt: skip
    assert unnamed.returncode == 0, unnamed.stderr
    assert "users-grpc: named Admin Admin; choose with --first-name and --last-name" in unnamed.stderr
