"""The one table from a refused UserService call to a SCIM Error (RFC 7644 section 3.12)."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from scim2_models import Error

from users_grpc.http_api.invoke import CallFailed

# status code -> (HTTP status, scimType or None)
_BY_CODE: dict[grpc.StatusCode, tuple[int, str | None]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalidValue"),
    grpc.StatusCode.NOT_FOUND: (404, None),
    grpc.StatusCode.ALREADY_EXISTS: (409, "uniqueness"),
    grpc.StatusCode.UNAUTHENTICATED: (401, None),
    grpc.StatusCode.PERMISSION_DENIED: (403, None),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "mutability"),
    grpc.StatusCode.ABORTED: (412, None),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "tooMany"),
    grpc.StatusCode.UNAVAILABLE: (503, None),
    grpc.StatusCode.DEADLINE_EXCEEDED: (503, None),
}
# Reasons that say more than their status code.
_BY_REASON: dict[str, tuple[int, str | None]] = {
    "MALFORMED_REQUEST": (400, "invalidSyntax"),
    "LAST_ACTIVE_ADMIN": (400, "mutability"),
    "ETAG_MISMATCH": (412, None),
}


class ScimError(Exception):
    """A SCIM Error to answer with."""

    def __init__(
        self, status: int, detail: str, scim_type: str | None = None, headers: tuple[tuple[str, str], ...] = ()
    ):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.scim_type = scim_type
        self.headers = headers

    def body(self) -> Error:
        return Error(status=self.status, scim_type=self.scim_type, detail=self.detail)


def from_call(failed: CallFailed) -> ScimError:
    reason, fields, retry = _details(failed)
    status, scim_type = _BY_REASON.get(reason) or _BY_CODE.get(failed.code, (500, None))
    detail = failed.message or reason.lower().replace("_", " ") or "refused"
    if fields:
        detail = f"{detail}: {', '.join(fields)}"
    headers: tuple[tuple[str, str], ...] = ()
    if status == 401:
        headers = (("www-authenticate", 'Bearer realm="users-grpc SCIM"'),)
    elif retry is not None:
        headers = (("retry-after", str(retry)),)
    return ScimError(status, detail, scim_type, headers)


def _details(failed: CallFailed) -> tuple[str, list[str], int | None]:
    reason, fields, retry = "", [], None
    for detail in failed.status.details:
        info, bad, delay = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest(), error_details_pb2.RetryInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            reason = info.reason
            if "field" in info.metadata:
                fields.append(f"{info.metadata['field']} is taken")
        elif detail.Is(bad.DESCRIPTOR):
            detail.Unpack(bad)
            fields.extend(f"{v.field} {v.description}" for v in bad.field_violations)
        elif detail.Is(delay.DESCRIPTOR):
            detail.Unpack(delay)
            retry = max(1, delay.retry_delay.seconds + (1 if delay.retry_delay.nanos else 0))
    return reason, fields, retry
