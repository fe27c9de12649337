"""The passkey example's HTTP gateway: serves the page beside it and forwards its JSON calls to
users.v1.UserService over gRPC, with the Python client package.

    python gateway.py localhost:50051 8000     # then open http://localhost:8000/

The server needs USERS_WEBAUTHN_RP_ID=localhost and USERS_WEBAUTHN_ORIGINS=http://localhost:8000
(the page's origin, exactly: scheme, host and port). WebAuthn runs only in a secure context, and
http://localhost is one, so the example needs no certificate; anywhere else, serve it over HTTPS.
EXAMPLE_ISSUER and EXAMPLE_AUDIENCE are the server's USERS_JWT_ISSUER and USERS_JWT_AUDIENCE
(default users-grpc), for GET /api/me.

``POST /rpc/<Method>`` takes the request of one of the RPCs in ``FORWARDED`` as proto3 JSON (what
grpcurl takes) and answers with the response as proto3 JSON, or with ``{"code", "reason",
"message"}`` and the HTTP status grpc-gateway gives that gRPC code. An ``authorization`` header is
passed on as the call's metadata. ``GET /api/me`` verifies the access token locally against the
key set (``TokenVerifier``) and answers with its claims. Nothing of a request's body or headers is
logged: they carry passwords and tokens.

An example, not a product: it calls anonymously, so the service's per-source rate limits count
all its users as one. A real gateway calls as a machine caller and passes each user's address
on in ``x-forwarded-for`` (docs/clients.md), and keeps the refresh token out of the page's reach.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import asdict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message

from users.v1 import user_service_pb2, user_service_pb2_grpc
from users_grpc_client import InvalidToken, TokenVerifier, error_reason

HERE = Path(__file__).resolve().parent
# The page's own files, by path; the Content-Security-Policy below lets it run only these.
PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/passkeys.js": ("passkeys.js", "text/javascript; charset=utf-8"),
}
# The RPCs the page calls, and only these: the gateway is no open door to the whole service.
FORWARDED = frozenset(
    {
        "Authenticate",
        "RevokeSession",
        "StartPasskeyRegistration",
        "FinishPasskeyRegistration",
        "StartPasskeySignIn",
        "FinishPasskeySignIn",
    }
)
# grpc-gateway's mapping of gRPC codes to HTTP statuses; any other code is 500.
HTTP_STATUS_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.ABORTED: HTTPStatus.CONFLICT,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.NOT_IMPLEMENTED,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
}
MAX_BODY_BYTES = 64 * 1024  # far above any WebAuthn response
CALL_TIMEOUT_SECONDS = 30.0
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

log = logging.getLogger("passkeys-gateway")


class Gateway(ThreadingHTTPServer):
    """The page and its RPCs, served on a socket bound already (a test binds port 0 and reads the
    port back first, since the server's USERS_WEBAUTHN_ORIGINS must name it)."""

    daemon_threads = True

    def __init__(self, listener: socket.socket, channel: grpc.Channel, *, issuer: str, audience: str) -> None:
        super().__init__(listener.getsockname()[:2], _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = listener
        self.server_activate()
        self.stub = user_service_pb2_grpc.UserServiceStub(channel)
        self.verifier = TokenVerifier(self.stub, issuer=issuer, audience=audience)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def forward(self, method: str, body: dict[str, Any], authorization: str | None) -> dict[str, Any]:
        """Call ``method`` with ``body`` as its request; raises grpc.RpcError as the call does."""
        descriptor = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].methods_by_name[method]
        request = message_factory.GetMessageClass(descriptor.input_type)()
        json_format.ParseDict(body, request)
        metadata = (("authorization", authorization),) if authorization else ()
        call: Callable[..., Message] = getattr(self.stub, method)
        reply = call(request, metadata=metadata, timeout=CALL_TIMEOUT_SECONDS)
        return json_format.MessageToDict(reply)


class _Handler(BaseHTTPRequestHandler):
    server: Gateway
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.partition("?")[0]
        if path == "/api/me":
            self._me()
        elif path in PAGE:
            name, content_type = PAGE[path]
            self._send(HTTPStatus.OK, (HERE / name).read_bytes(), content_type)
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"code": "NOT_FOUND", "reason": "", "message": "no such page"})

    def do_POST(self) -> None:
        body = self._json_body()
        if body is None:
            return
        method = self.path.removeprefix("/rpc/")
        if method not in FORWARDED:
            self._send_json(HTTPStatus.NOT_FOUND, {"code": "NOT_FOUND", "reason": "", "message": "no such RPC"})
            return
        try:
            reply = self.server.forward(method, body, self.headers.get("Authorization"))
        except json_format.ParseError as error:
            self._send_json(HTTPStatus.BAD_REQUEST, {"code": "INVALID_ARGUMENT", "reason": "", "message": str(error)})
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            refusal = {"code": code.name, "reason": error_reason(error), "message": error.details()}
            self._send_json(HTTP_STATUS_OF.get(code, HTTPStatus.INTERNAL_SERVER_ERROR), refusal)
        else:
            self._send_json(HTTPStatus.OK, reply)

    def _me(self) -> None:
        token = self.headers.get("Authorization", "").removeprefix("Bearer ")
        try:
            claims = self.server.verifier.verify(token)
        except InvalidToken as error:
            self._send_json(HTTPStatus.UNAUTHORIZED, {"code": "UNAUTHENTICATED", "reason": "", "message": str(error)})
        else:
            self._send_json(HTTPStatus.OK, {key: str(value) for key, value in asdict(claims).items()})

    def _json_body(self) -> dict[str, Any] | None:
        """The request's JSON object, or None after answering why there is none. Only
        application/json: a cross-site form cannot send that without the browser asking first."""
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get_content_type() != "application/json" or not 0 < length <= MAX_BODY_BYTES:
            self.close_connection = True  # the body, if any, stays unread
            self._send_json(HTTPStatus.BAD_REQUEST, {"code": "INVALID_ARGUMENT", "reason": "", "message": "bad body"})
            return None
        try:
            body = json.loads(self.rfile.read(length))
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self._send_json(HTTPStatus.BAD_REQUEST, {"code": "INVALID_ARGUMENT", "reason": "", "message": "not JSON"})
            return None
        return body

    def _send_json(self, status: HTTPStatus, document: dict[str, Any]) -> None:
        self._send(status, json.dumps(document).encode(), "application/json")

    def _send(self, status: HTTPStatus, content: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(content)

    def log_message(self, format: str, *args: Any) -> None:
        # The request line and status only (the path names the RPC; bodies and headers are secret).
        log.info("%s %s", self.address_string(), format % args)


def serve_in_thread(gateway: Gateway) -> threading.Thread:
    thread = threading.Thread(target=gateway.serve_forever, name=f"gateway-{gateway.port}", daemon=True)
    thread.start()
    return thread


def main(grpc_address: str, port: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    listener = socket.create_server(("127.0.0.1", int(port)))
    with grpc.insecure_channel(grpc_address) as channel:
        issuer = os.environ.get("EXAMPLE_ISSUER", "users-grpc")
        audience = os.environ.get("EXAMPLE_AUDIENCE", "users-grpc")
        with Gateway(listener, channel, issuer=issuer, audience=audience) as gateway:
            print(f"open http://localhost:{gateway.port}/ (USERS_WEBAUTHN_ORIGINS must name it)", flush=True)
            gateway.serve_forever()


if __name__ == "__main__":
    main(*sys.argv[1:3])
