"""The passkey example (clients/python/examples/passkeys) in a real browser: headless Chromium
with a CDP virtual authenticator, the example's page and gateway, a real server. A passkey is
added after a password sign-in and signs in alone (usernameless) after signing out; the server
refuses a passkey ceremony from an origin outside USERS_WEBAUTHN_ORIGINS. And the gateway alone,
over plain HTTP: what it forwards, how it answers a refusal, what it logs."""

from __future__ import annotations

import base64
import http.client
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest

from tests.support.browser import PasskeyBrowser, running_gateway
from tests.support.calls import PASSWORD, lines_holding, rpc_error, signed_up
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from tests.support.sockets import bound_socket, port_of
from users.v1 import user_service_pb2 as pb
from users_grpc_client import TokenVerifier


@dataclass
class Example:
    server: RunningServer
    origin: str  # the page's, the one USERS_WEBAUTHN_ORIGINS lists
    unlisted_origin: str  # the same page and gateway on another port, which it does not


@pytest.fixture
def example(start_server: StartServer) -> Iterator[Example]:
    with bound_socket() as listed, bound_socket() as unlisted:
        server = start_server(
            webauthn_rp_id="localhost",
            webauthn_rp_name="users-grpc example",
            webauthn_origins=(f"http://localhost:{port_of(listed)}",),
        )
        with running_gateway(listed, server) as origin, running_gateway(unlisted, server) as unlisted_origin:
            yield Example(server, origin, unlisted_origin)


def page_session(browser: PasskeyBrowser) -> dict[str, Any]:
    """The session the page holds (Authenticate's response as proto3 JSON)."""
    session: dict[str, Any] = browser.page.evaluate("() => passkeyExample.session")
    return session


def sign_in_with_password(browser: PasskeyBrowser, origin: str) -> dict[str, Any]:
    browser.page.goto(origin)
    browser.page.fill("#identifier", "jane")
    browser.page.fill("#password", PASSWORD)
    assert browser.act("#password-sign-in") == ("ok", "signed in with a password")
    return page_session(browser)


def add_passkey(browser: PasskeyBrowser, password: str = "") -> tuple[str, str]:
    """Without a password: the sign-in just now is recent enough (USERS_WEBAUTHN_REAUTH_SECONDS)."""
    browser.page.fill("#current-password", password)
    return browser.act("#add-passkey")


def test_a_passkey_added_in_the_page_signs_in_alone_after_signing_out_and_its_tokens_verify(
    example: Example, mail: MailSink, passkey_browser: PasskeyBrowser
) -> None:
    server = example.server
    user_id = signed_up(server, mail).user.id
    by_password = sign_in_with_password(passkey_browser, example.origin)

    assert add_passkey(passkey_browser) == ("ok", "passkey added")
    [passkey] = passkey_browser.credentials()
    assert passkey["isResidentCredential"], "a passkey is discoverable: it signs in with no username"
    assert passkey["rpId"] == "localhost"
    user_handle = base64.b64decode(passkey["userHandle"])
    assert user_handle not in (user_id.encode(), bytes.fromhex(user_id), b"jane", b"jane@example.com")

    assert passkey_browser.act("#sign-out") == ("ok", "signed out")
    refused = rpc_error(
        server.anonymous.RefreshSession, pb.RefreshSessionRequest(refresh_token=by_password["refreshToken"])
    )
    assert refused.code() == grpc.StatusCode.UNAUTHENTICATED

    assert passkey_browser.act("#passkey-sign-in") == ("ok", "signed in with a passkey")
    by_passkey = page_session(passkey_browser)
    assert passkey_browser.page.inner_text("#who") == f"jane ({user_id})"
    verifier = TokenVerifier(server.anonymous, issuer=server.settings.jwt_issuer, audience=server.settings.jwt_audience)
    claims = verifier.verify(by_passkey["accessToken"])
    assert (claims.subject, claims.role, claims.session_id) == (user_id, "user", by_passkey["sessionId"])
    assert by_passkey["sessionId"] != by_password["sessionId"]
    validated = server.stub.ValidateToken(pb.ValidateTokenRequest(access_token=by_passkey["accessToken"])).claims
    assert validated.subject == user_id
    refreshed = server.anonymous.RefreshSession(pb.RefreshSessionRequest(refresh_token=by_passkey["refreshToken"]))
    assert refreshed.session_id == by_passkey["sessionId"]


def test_the_server_refuses_a_passkey_ceremony_from_an_origin_it_does_not_list(
    example: Example, mail: MailSink, passkey_browser: PasskeyBrowser
) -> None:
    signed_up(example.server, mail)
    sign_in_with_password(passkey_browser, example.unlisted_origin)
    state, status = add_passkey(passkey_browser, PASSWORD)
    assert (state, status.split(" ")[:3]) == (
        "failed",
        ["FinishPasskeyRegistration:", "INVALID_ARGUMENT", "INVALID_PASSKEY_REGISTRATION"],
    )
    # The browser made the credential (http://localhost:<port> may use RP id localhost): the
    # refusal was the server's.
    assert len(passkey_browser.credentials()) == 1
    passkey_browser.cdp.send("WebAuthn.clearCredentials", {"authenticatorId": passkey_browser.authenticator_id})

    sign_in_with_password(passkey_browser, example.origin)
    assert add_passkey(passkey_browser) == ("ok", "passkey added")
    assert passkey_browser.act("#sign-out") == ("ok", "signed out")
    passkey_browser.page.goto(example.unlisted_origin)
    state, status = passkey_browser.act("#passkey-sign-in")
    assert (state, status.split(" ")[:3]) == ("failed", ["FinishPasskeySignIn:", "UNAUTHENTICATED", "INVALID_PASSKEY"])

    passkey_browser.page.goto(example.origin)
    assert passkey_browser.act("#passkey-sign-in") == ("ok", "signed in with a passkey")


def gateway_call(
    origin: str, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    """One HTTP request to the example's gateway; its status and JSON answer. To 127.0.0.1, where
    the gateway listens (localhost may name [::1] first)."""
    connection = http.client.HTTPConnection("127.0.0.1", urlsplit(origin).port, timeout=30)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        connection.close()


def rpc(origin: str, method: str, request: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    return gateway_call(
        origin, "POST", f"/rpc/{method}", json.dumps(request).encode(), {"Content-Type": "application/json", **headers}
    )


def test_the_gateway_forwards_only_the_pages_rpcs_answers_refusals_as_http_and_logs_no_secret(
    example: Example, mail: MailSink, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="passkeys-gateway")
    user_id = signed_up(example.server, mail).user.id
    origin = example.origin

    status, refusal = rpc(origin, "GetUser", {"id": user_id})
    assert (status, refusal["message"]) == (404, "no such RPC")
    status, refusal = rpc(origin, "Authenticate", {"identifier": "jane", "password": "not the password at all"})
    assert (status, refusal["code"], refusal["reason"]) == (401, "UNAUTHENTICATED", "INVALID_CREDENTIALS")
    status, refusal = rpc(origin, "Authenticate", {"identifier": "jane", "passwrd": PASSWORD})
    assert (status, refusal["code"]) == (400, "INVALID_ARGUMENT")
    status, refusal = gateway_call(
        origin, "POST", "/rpc/Authenticate", b"identifier=jane", {"Content-Type": "text/plain"}
    )
    assert (status, refusal["code"]) == (400, "INVALID_ARGUMENT")

    status, session = rpc(origin, "Authenticate", {"identifier": "jane", "password": PASSWORD})
    assert (status, session["user"]["id"]) == (200, user_id)
    status, claims = gateway_call(
        origin, "GET", "/api/me", headers={"Authorization": f"Bearer {session['accessToken']}"}
    )
    assert (status, claims["subject"], claims["session_id"]) == (200, user_id, session["sessionId"])
    status, _ = gateway_call(origin, "GET", "/api/me", headers={"Authorization": "Bearer not.a.token"})
    assert status == 401
    assert rpc(origin, "RevokeSession", {"refreshToken": session["refreshToken"]}) == (200, {})

    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "POST /rpc/Authenticate" in text  # the gateway logs its requests (so the check below can fail) ...
    for secret in (PASSWORD, session["accessToken"], session["refreshToken"]):
        assert not lines_holding(secret, text)  # ... but nothing of their bodies or headers
