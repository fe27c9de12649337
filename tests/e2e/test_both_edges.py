"""No rule holds on one edge and not the other: every RPC of the service descriptor, called as
anonymous, a user, another user, an admin and a machine caller, over gRPC and over the HTTP edge
(Connect, binary protobuf), answers the same status code and ErrorInfo reason. The server stream
(WatchUserChanges) is compared by its admission: its first change ("OK") or the status it ends with.

The list of RPCs is the descriptor's, so an RPC added to the proto without a row in SAMPLES fails
here. Each row says whom its request names: "self" (the user's own id: a read, or a request the
service refuses for its content, so no call changes what the next one sees) or "ghost" (a
well-formed id of nobody: for the calls that would change the account, such as a deletion or
revoking its sessions). The rest of each request is empty, so every admitted call is refused by the
service for its content, or answers, without side effects that would make the two edges differ.
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from typing import Any, Literal

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.message import Message
from google.rpc import error_details_pb2

from tests.support.calls import create_service_account, issue_service_token, signed_up
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["UserService"]
GHOST_ID = "0123456789abcdef01234567"
Subject = Literal["self", "ghost", "none"]

SAMPLES: dict[str, Subject] = {
    "CreateUser": "none",
    "ActivateUser": "none",
    "ResendActivationCode": "none",
    "GetUser": "self",
    "GetUserByIdentifier": "none",
    "DeleteUser": "ghost",
    "DeleteUserByIdentifier": "none",
    "VerifyCredentials": "none",
    "Authenticate": "none",
    "RefreshSession": "none",
    "RevokeSession": "none",
    "ListSessions": "self",
    "RevokeAllSessions": "ghost",
    "GetPublicKeys": "none",
    "ValidateToken": "none",
    "ForgotPassword": "none",
    "ResetPassword": "none",
    "ChangePassword": "self",
    "EnableMfa": "self",
    "GetMfaQrCode": "self",
    "ConfirmMfa": "self",
    "DisableMfa": "self",
    "RegenerateRecoveryCodes": "self",
    "ChangeEmail": "self",
    "ConfirmEmailChange": "self",
    "SetUserEmail": "ghost",
    "SetUserRole": "ghost",
    "DeactivateUser": "ghost",
    "ReactivateUser": "ghost",
    "LockUser": "ghost",
    "UnlockUser": "ghost",
    "ResetUserMfa": "ghost",
    "ImportUsers": "none",
    "CreateServiceAccount": "none",
    "IssueServiceToken": "none",
    "ListServiceAccounts": "none",
    "DeleteServiceAccount": "none",
    "ListUsers": "none",
    "UpdateUser": "self",
    "ListAuditEvents": "none",
    "SetUserMetadata": "self",
    "GetUserMetadata": "self",
    "ListUserMetadata": "self",
    "DeleteUserMetadata": "self",
    "CreateGroup": "none",
    "RenameGroup": "none",
    "DeleteGroup": "none",
    "ListGroups": "none",
    "AddGroupMember": "ghost",
    "RemoveGroupMember": "ghost",
    "ListGroupMembers": "none",
    "ListUserGroups": "self",
    "StartPasskeyRegistration": "self",
    "FinishPasskeyRegistration": "self",
    "StartPasskeySignIn": "none",
    "FinishPasskeySignIn": "none",
    "ListAuthenticationFactors": "self",
    "RenamePasskey": "self",
    "RemovePasskey": "self",
    "ListUserAuthenticationFactors": "self",
    "RemoveUserPasskey": "ghost",
    "SetPassword": "ghost",
    "CreateServiceAccountToken": "none",
    "ListServiceAccountTokens": "none",
    "RevokeServiceAccountToken": "none",
}
# Compared by their admission (each is opened, read to its first change, and closed).
STREAMS = {"WatchUserChanges"}

Outcome = tuple[str, str]  # (status code name, ErrorInfo reason)


def unary_methods() -> list[str]:
    return [m.name for m in SERVICE.methods if not m.server_streaming]


def test_every_unary_rpc_has_a_sample_and_the_streams_are_listed() -> None:
    assert sorted(unary_methods()) == sorted(SAMPLES), "add a row to SAMPLES for each new RPC"
    assert {m.name for m in SERVICE.methods if m.server_streaming} == STREAMS


def request_for(name: str, user_id: str) -> Message:
    method = SERVICE.methods_by_name[name]
    # The request may live in another file of the package (metadata.proto, group.proto, ...).
    request_class: Any = message_factory.GetMessageClass(method.input_type)
    request: Message = request_class()
    subject = {"self": user_id, "ghost": GHOST_ID, "none": None}[SAMPLES.get(name, "none")]
    if subject is not None:
        for field in ("id", "user_id"):
            if field in method.input_type.fields_by_name:
                setattr(request, field, subject)
    return request


def over_grpc(server: RunningServer, name: str, request: Message, token: str | None) -> Outcome:
    call: Any = server.channel.unary_unary(
        f"/{SERVICE.full_name}/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    try:
        call(request, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        reason = ""
        failed: Any = error
        for key, value in failed.trailing_metadata() or ():
            if key == "grpc-status-details-bin":
                reason = _reason(value)
        return str(failed.code().name), reason
    return "OK", ""


def _reason(status_bytes: bytes) -> str:
    from google.rpc import status_pb2

    for detail in status_pb2.Status.FromString(status_bytes).details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def stream_over_grpc(server: RunningServer, name: str, request: Message, token: str | None) -> Outcome:
    call: Any = server.channel.unary_stream(
        f"/{SERVICE.full_name}/{name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=lambda b: b,
    )
    metadata = () if token is None else (("authorization", f"Bearer {token}"),)
    stream = call(request, metadata=metadata, timeout=30)
    try:
        next(stream)
    except grpc.RpcError as error:
        failed: Any = error
        details = dict(failed.trailing_metadata() or ()).get("grpc-status-details-bin")
        return str(failed.code().name), "" if details is None else _reason(details)
    finally:
        stream.cancel()
    return "OK", ""


def over_http(server: RunningServer, name: str, request: Message, token: str | None) -> Outcome:
    headers = {"Content-Type": "application/proto", "Connect-Protocol-Version": "1"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"http://127.0.0.1:{server.app.http_port}/{SERVICE.full_name}/{name}"
    sent = urllib.request.Request(url, data=request.SerializeToString(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(sent, timeout=30):  # noqa: S310 - the test's own server
            return "OK", ""
    except urllib.error.HTTPError as error:
        return _connect_outcome(json.loads(error.read()))


def stream_over_http(server: RunningServer, name: str, request: Message, token: str | None) -> Outcome:
    """A Connect server stream: one enveloped request; each answer envelope is a change, the one
    flagged 2 the stream's end (with its error, if any)."""
    message = request.SerializeToString()
    headers = {"Content-Type": "application/connect+proto"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    url = f"http://127.0.0.1:{server.app.http_port}/{SERVICE.full_name}/{name}"
    body = b"\x00" + len(message).to_bytes(4, "big") + message
    sent = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(sent, timeout=30) as answer:  # noqa: S310 - the test's own server
        flags, size = answer.read(1)[0], int.from_bytes(answer.read(4), "big")
        envelope = answer.read(size)
    if flags & 2 == 0:
        return "OK", ""  # a change: admitted (closing the connection ends the stream)
    return _connect_outcome(json.loads(envelope)["error"])


def _connect_outcome(answer: dict[str, Any]) -> Outcome:
    reason = ""
    for detail in answer.get("details", []):
        if detail["type"] == "google.rpc.ErrorInfo":
            reason = error_details_pb2.ErrorInfo.FromString(base64.b64decode(detail["value"] + "==")).reason
    code = "CANCELLED" if answer["code"] == "canceled" else answer["code"].upper()
    return code, reason


@pytest.fixture
def callers(start_server: StartServer, mail: MailSink) -> tuple[RunningServer, str, dict[str, str | None]]:
    server = start_server(http_address="127.0.0.1:0")
    user = signed_up(server, mail, "edge-user")
    other = signed_up(server, mail, "edge-other")
    account = create_service_account(server, "edge-machine")
    machine = issue_service_token(server, account.service_account.client_id, account.client_secret)
    return (
        server,
        user.user.id,
        {
            "anonymous": None,
            "user": user.access_token,
            "other user": other.access_token,
            "admin": server.admin_token,
            "machine": machine.access_token,
        },
    )


def test_every_rpc_answers_each_caller_the_same_over_both_edges(
    callers: tuple[RunningServer, str, dict[str, str | None]],
) -> None:
    server, user_id, tokens = callers
    differences = []
    outcomes = set()
    for name in [*unary_methods(), *sorted(STREAMS)]:
        request = request_for(name, user_id)
        streams = name in STREAMS
        for caller, token in tokens.items():
            grpc_outcome = (stream_over_grpc if streams else over_grpc)(server, name, request, token)
            http_outcome = (stream_over_http if streams else over_http)(server, name, request, token)
            outcomes.add(grpc_outcome[0])
            if grpc_outcome != http_outcome:
                differences.append(f"{name} as {caller}: gRPC {grpc_outcome}, HTTP {http_outcome}")
    assert differences == []
    # The table exercises the rules, not one answer: admitted, refused either way, and served.
    assert {"OK", "UNAUTHENTICATED", "PERMISSION_DENIED", "INVALID_ARGUMENT"} <= outcomes
