"""The SCIM 2.0 ASGI app, mounted at /scim/v2 on the HTTP edge.

Every write is a UserService call through :data:`Invoke` with the request's own
``authorization`` header, so the access table decides who may provision (docs/scim.md).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

import grpc
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from pydantic import ValidationError
from scim2_models import (
    Context,
    ListResponse,
    PatchOp,
    ResourceType,
    ResponseParameters,
    SCIMException,
    SearchRequest,
    ServiceProviderConfig,
    User,
)

from users.v1 import user_pb2
from users.v1 import user_service_pb2 as pb
from users_grpc.http_api.invoke import CallFailed, HttpCall, Invoke, grpc_peer
from users_grpc.scim import errors, filters, mapping
from users_grpc.scim.errors import ScimError
from users_grpc.scim.mapping import ScimUser

_SERVICE = "/users.v1.UserService/"
_CONTENT_TYPE = "application/scim+json"
# SCIM's startIndex is an offset; ListUsers is keyset-paged, so reaching it reads every user
# before it. Both are capped to keep one request's cost bounded.
MAX_COUNT = 1000
MAX_START_INDEX = 10_000
DEFAULT_COUNT = 100
# The User schema has some thirty attributes and sub-attributes; scim2-models validates a list of
# them in time quadratic in its length (10,000: 4 s), on the shared loop.
MAX_ATTRIBUTES = 100
# A body is validated by scim2-models before any call checks the bearer, at some 0.3 ms a list item:
# a MiB of emails or PATCH operations stalled every call for seconds. An IdP's user is a few KiB,
# with lists of one to a few items, and a PATCH of some ten operations.
MAX_BODY_BYTES = 64 * 1024
MAX_LIST_ITEMS = 100
MAX_DEPTH = 16
_LISTED_PAGE = 1000
_ENTERPRISE = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
_ENDPOINTS = ("ServiceProviderConfig", "ResourceTypes", "Schemas", "Users")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class _Response:
    def __init__(self, status: int, body: object | None = None, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.status = status
        self.body = body
        self.headers = headers


class ScimApp:
    """The routes of RFC 7644 for the User resource, and the three discovery endpoints."""

    def __init__(self, invoke: Invoke) -> None:
        self._invoke = invoke

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            response = await self._route(scope, receive)
        except ScimError as refused:
            response = _Response(refused.status, refused.body().model_dump(mode="json"), refused.headers)
        except SCIMException as refused:
            error = refused.to_error()
            response = _Response(error.status or 400, error.model_dump(mode="json"))
        except CallFailed as failed:
            translated = errors.from_call(failed)
            response = _Response(translated.status, translated.body().model_dump(mode="json"), translated.headers)
        except ValidationError as invalid:
            error = ScimError(400, _first_error(invalid), "invalidValue").body()
            response = _Response(400, error.model_dump(mode="json"))
        await _send(send, response)

    async def _route(self, scope: Scope, receive: Receive) -> _Response:
        method = scope["method"]
        # Mounted: the HTTP edge puts its prefix (/scim/v2) in root_path and the rest in path.
        path = scope["path"].rstrip("/")
        request = _Request(scope, await _body(receive), self._base_url(scope))
        parts = path.strip("/").split("/") if path else []
        if parts == ["ServiceProviderConfig"] and method == "GET":
            return _Response(200, _service_provider_config(request.base_url))
        if parts == ["ResourceTypes"] and method == "GET":
            return _Response(200, _list([_resource_type(request.base_url)]))
        if parts == ["ResourceTypes", "User"] and method == "GET":
            return _Response(200, _resource_type(request.base_url))
        if parts == ["Schemas"] and method == "GET":
            return _Response(200, _list([_schema(request.base_url)]))
        if parts == ["Schemas", mapping.USER_SCHEMA] and method == "GET":
            return _Response(200, _schema(request.base_url))
        if parts in ([".search"], ["Users", ".search"]) and method == "POST":
            # At the root as under /Users: User is the only resource type, so both search the users.
            return await self._search_users(request)
        if parts == ["Users"]:
            if method == "GET":
                return await self._list_users(request)
            if method == "POST":
                return await self._create_user(request)
        if len(parts) == 2 and parts[0] == "Users":
            handler = {
                "GET": self._get_user,
                "PUT": self._replace_user,
                "PATCH": self._patch_user,
                "DELETE": self._delete_user,
            }.get(method)
            if handler is not None:
                return await handler(request, parts[1])
        if (len(parts) == 1 and parts[0] in _ENDPOINTS) or (len(parts) == 2 and parts[0] == "Users"):
            raise ScimError(405, f"{method} is not allowed on {scope['path']}")
        raise ScimError(404, f"no such endpoint: {method} {scope['path']}")

    def _base_url(self, scope: Scope) -> str:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"localhost").decode("latin-1")
        return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}"

    async def _call(self, request: _Request, method: str, message: Message) -> Any:
        try:
            return await self._invoke(_SERVICE + method, message, request.call)
        except CallFailed as failed:
            raise errors.from_call(failed) from None

    # --- Users

    async def _get_user(self, request: _Request, user_id: str) -> _Response:
        user = await self._fetch(request, user_id)
        return self._user_response(200, user, request)

    async def _fetch(self, request: _Request, user_id: str) -> user_pb2.User:
        response = await self._call(request, "GetUser", pb.GetUserRequest(user_id=user_id))
        return response.user  # type: ignore[no-any-return]

    async def _create_user(self, request: _Request) -> _Response:
        resource: ScimUser = User.model_validate(request.json(), scim_ctx=Context.RESOURCE_CREATION_REQUEST)
        wanted = mapping.wanted(resource)
        # ImportUsers, not CreateUser: the IdP vouches for the address (the account is created
        # active, email verified, no activation mail) and no password is set here.
        item = pb.ImportedUser(
            username=wanted.username,
            first_name=wanted.first_name,
            last_name=wanted.last_name,
            email=wanted.email,
            email_verified=True,
            external_id=wanted.external_id,
        )
        response = await self._call(request, "ImportUsers", pb.ImportUsersRequest(users=[item]))
        result = response.results[0]
        if result.HasField("error"):
            raise errors.from_call(_failure_of(result.error))
        user = result.user
        if not wanted.active:
            user = (await self._call(request, "DeactivateUser", pb.DeactivateUserRequest(user_id=user.id))).user
        return self._user_response(201, user, request)

    async def _replace_user(self, request: _Request, user_id: str) -> _Response:
        # The read first: it checks the bearer, so that a stranger's body is never validated.
        current = await self._fetch(request, user_id)
        resource: ScimUser = User.model_validate(request.json(), scim_ctx=Context.RESOURCE_REPLACEMENT_REQUEST)
        self._check_version(request, current)
        user = await self._apply(request, current, mapping.wanted(resource))
        return self._user_response(200, user, request)

    async def _patch_user(self, request: _Request, user_id: str) -> _Response:
        current = await self._fetch(request, user_id)  # as in PUT: the bearer checked before the body
        patch = PatchOp[ScimUser].model_validate(request.json(), scim_ctx=Context.RESOURCE_PATCH_REQUEST)
        self._check_version(request, current)
        resource = mapping.to_scim(current, request.base_url)
        patch.patch(resource)
        if resource.active is None:
            # Required in /Schemas: an account is active or not, and removing it must not reactivate one.
            raise ScimError(400, "active cannot be removed: every account is active or not", "mutability")
        user = await self._apply(request, current, mapping.wanted(resource))
        return self._user_response(200, user, request)

    async def _delete_user(self, request: _Request, user_id: str) -> _Response:
        if request.if_match is not None:
            self._check_version(request, await self._fetch(request, user_id))
        await self._call(request, "DeleteUser", pb.DeleteUserRequest(user_id=user_id))
        return _Response(204)

    async def _apply(self, request: _Request, current: user_pb2.User, wanted: mapping.Wanted) -> user_pb2.User:
        """The calls that make ``current`` what ``wanted`` says, each only if it changes something."""
        user = current
        paths = [
            path
            for path, new, old in (
                ("username", wanted.username, current.username),
                ("first_name", wanted.first_name, current.first_name),
                ("last_name", wanted.last_name, current.last_name),
                ("external_id", wanted.external_id, current.external_id),
            )
            if new != old
        ]
        if paths:
            update = pb.UpdateUserRequest(
                user_id=current.id,
                user=user_pb2.User(
                    username=wanted.username,
                    first_name=wanted.first_name,
                    last_name=wanted.last_name,
                    external_id=wanted.external_id,
                ),
                update_mask=field_mask_pb2.FieldMask(paths=paths),
                etag=current.etag,
            )
            user = (await self._call(request, "UpdateUser", update)).user
        if wanted.email.casefold() != current.email.casefold():
            set_email = pb.SetUserEmailRequest(user_id=current.id, email=wanted.email)
            user = (await self._call(request, "SetUserEmail", set_email)).user
        active = user.state == user_pb2.USER_STATE_ACTIVE
        if wanted.active and not active:
            user = (await self._call(request, "ReactivateUser", pb.ReactivateUserRequest(user_id=current.id))).user
        elif not wanted.active and active:
            user = (await self._call(request, "DeactivateUser", pb.DeactivateUserRequest(user_id=current.id))).user
        return user

    def _check_version(self, request: _Request, current: user_pb2.User) -> None:
        if_match = request.if_match
        if if_match is not None and if_match.strip() != "*" and mapping.etag_of(if_match) != current.etag:
            raise ScimError(412, "the user changed since that version: read it again")

    async def _list_users(self, request: _Request) -> _Response:
        start_index = request.integer("startIndex", 1, low=1, high=MAX_START_INDEX)
        count = request.integer("count", DEFAULT_COUNT, low=0, high=MAX_COUNT)
        return await self._listed(request, start_index, count, request.query("filter"))

    async def _search_users(self, request: _Request) -> _Response:
        """POST .search (RFC 7644 section 3.4.3): the list's parameters in a SearchRequest body."""
        body = request.json()
        if isinstance(body, dict) and isinstance(body.get("filter"), str):
            filters.check_length(body["filter"])  # before scim2-models parses it, on the shared loop
        if isinstance(body, dict):
            for name in ("attributes", "excludedAttributes"):
                _check_attributes(name, body.get(name))
        search: SearchRequest[Any] = SearchRequest.model_validate(body, scim_ctx=Context.SEARCH_REQUEST)
        start_index = _bounded("startIndex", search.start_index, 1, low=1, high=MAX_START_INDEX)
        count = _bounded("count", search.count, DEFAULT_COUNT, low=0, high=MAX_COUNT)
        request.attributes = list(search.attributes) if search.attributes else None
        request.excluded = list(search.excluded_attributes) if search.excluded_attributes else None
        return await self._listed(request, start_index, count, None if search.filter is None else str(search.filter))

    async def _listed(self, request: _Request, start_index: int, count: int, text: str | None) -> _Response:
        if text is not None:
            users = await self._lookup(request, filters.parse(text))
            total = len(users)
            page = users[start_index - 1 : start_index - 1 + count]
        else:
            page, total = await self._page(request, start_index - 1, count)
        resources = [mapping.to_scim(user, request.base_url) for user in page]
        listed = ListResponse[ScimUser](
            total_results=total, start_index=start_index, items_per_page=len(resources), resources=resources
        )
        return _Response(200, request.dump(listed, Context.SEARCH_RESPONSE))

    async def _page(self, request: _Request, offset: int, count: int) -> tuple[list[user_pb2.User], int]:
        """``count`` users after the first ``offset``, oldest first, by walking ListUsers' pages."""
        wanted_end = offset + count
        seen: list[user_pb2.User] = []
        token, total = "", 0
        while True:
            size = max(1, min(_LISTED_PAGE, wanted_end - len(seen)))
            # totalResults: counted once, with the first page (a count walks every user).
            listing = pb.ListUsersRequest(page_size=size, page_token=token, include_total_size=not token)
            listed = await self._call(request, "ListUsers", listing)
            seen.extend(listed.users)
            if listing.include_total_size:
                total = listed.total_size
            token = listed.next_page_token
            if not token or len(seen) >= wanted_end:
                return seen[offset:wanted_end], total

    async def _lookup(self, request: _Request, lookup: filters.UserLookup) -> list[user_pb2.User]:
        """The users the filter names: exact, regardless of letter case, as usernames and emails are unique."""
        key = lookup.user_name if lookup.user_name is not None else lookup.email
        if (key is None and not lookup.external_id) or "" in (lookup.user_name, lookup.email):
            return []  # no account has an empty username or email; as a prefix, "" would walk them all
        candidates: list[user_pb2.User] = []
        token = ""
        while True:  # every user the filters match: more than a page only for a prefix of many names
            listing = pb.ListUsersRequest(
                page_size=_LISTED_PAGE, prefix=key or "", external_id=lookup.external_id or "", page_token=token
            )
            listed = await self._call(request, "ListUsers", listing)
            candidates.extend(listed.users)
            token = listed.next_page_token
            if not token:
                break
        return [
            user
            for user in candidates
            if (lookup.user_name is None or user.username.casefold() == lookup.user_name.casefold())
            and (lookup.email is None or user.email.casefold() == lookup.email.casefold())
            and (lookup.external_id is None or user.external_id == lookup.external_id)
        ]

    def _user_response(self, status: int, user: user_pb2.User, request: _Request) -> _Response:
        resource = mapping.to_scim(user, request.base_url)
        context = Context.RESOURCE_CREATION_RESPONSE if status == 201 else Context.RESOURCE_QUERY_RESPONSE
        headers = [("etag", mapping.version_of(user))]
        if status == 201:
            headers.append(("location", f"{request.base_url}/Users/{user.id}"))
        return _Response(status, request.dump(resource, context), tuple(headers))


class _Request:
    def __init__(self, scope: Scope, body: bytes, base_url: str) -> None:
        self._query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        self._body = body
        self.base_url = base_url
        # From the query string, or set from a SearchRequest body.
        self.attributes = _names(self.query("attributes"))
        self.excluded = _names(self.query("excludedAttributes"))
        _check_attributes("attributes", self.attributes)
        _check_attributes("excludedAttributes", self.excluded)
        headers = [(key.decode("latin-1").lower(), value.decode("latin-1")) for key, value in scope.get("headers", [])]
        self.if_match = next((value for key, value in headers if key == "if-match"), None)
        client = scope.get("client") or ("0.0.0.0", 0)  # noqa: S104  # a peer string, not a bind address
        metadata = tuple((key, value) for key, value in headers if key in ("authorization", "x-forwarded-for"))
        self.call = HttpCall(metadata=metadata, peer=grpc_peer(client[0], client[1]))
        if not any(key == "authorization" for key, _ in metadata):
            raise ScimError(
                401, "a bearer token is required", headers=(("www-authenticate", 'Bearer realm="users-grpc SCIM"'),)
            )

    def query(self, name: str) -> str | None:
        values = self._query.get(name)
        return values[0] if values else None

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        text = self.query(name)
        if text is None:
            return default
        try:
            value = int(text)
        except ValueError:
            raise ScimError(400, f"{name} must be a whole number", "invalidValue") from None
        return _bounded(name, value, default, low=low, high=high)

    def dump(self, resource: Any, context: Context) -> dict[str, Any]:
        """``resource`` as JSON, cut to the ``attributes`` or ``excludedAttributes`` asked for."""
        dumped: dict[str, Any] = resource.model_dump(
            mode="json",
            scim_ctx=context,
            response_parameters=ResponseParameters.model_validate(
                {"attributes": self.attributes, "excludedAttributes": self.excluded}
            ),
        )
        return dumped

    def json(self) -> Any:
        if len(self._body) > MAX_BODY_BYTES:
            raise ScimError(413, f"a SCIM request body is at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self._body)
        except (ValueError, RecursionError):  # nested deeper than the parser goes: no less malformed
            raise ScimError(400, "the body is not JSON", "invalidSyntax") from None
        _check_shape(body)
        if isinstance(body, dict) and isinstance(body.get("schemas"), list):
            # Entra ID sends the enterprise extension with every user; none of it is mapped
            # (docs/scim.md), so it is accepted and dropped rather than refused.
            body["schemas"] = [urn for urn in body["schemas"] if urn != _ENTERPRISE]
            body.pop(_ENTERPRISE, None)
        return body


def _bounded(name: str, value: int | None, default: int, *, low: int, high: int) -> int:
    if value is None:
        return default
    if value > high:
        raise ScimError(400, f"{name} must be at most {high}", "invalidValue")
    return max(low, value)


def _check_shape(body: object) -> None:
    """Every list of ``body`` at most MAX_LIST_ITEMS long, and no deeper than MAX_DEPTH."""
    pending = [(body, 0)]
    while pending:
        value, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise ScimError(400, f"the body is nested deeper than {MAX_DEPTH}", "invalidSyntax")
        if isinstance(value, list):
            if len(value) > MAX_LIST_ITEMS:
                raise ScimError(400, f"a list of the body holds at most {MAX_LIST_ITEMS} items", "invalidValue")
            pending.extend((item, depth + 1) for item in value)
        elif isinstance(value, dict):
            pending.extend((item, depth + 1) for item in value.values())


def _check_attributes(name: str, names: object) -> None:
    if isinstance(names, list) and len(names) > MAX_ATTRIBUTES:
        raise ScimError(400, f"{name} names at most {MAX_ATTRIBUTES} attributes", "invalidValue")


def _names(text: str | None) -> list[str] | None:
    return text.split(",") if text else None


def _failure_of(status: Any) -> CallFailed:
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return CallFailed(code, status.message, status)


async def _body(receive: Receive) -> bytes:
    # The HTTP edge has read it already, within USERS_HTTP_MAX_BODY_BYTES, and replays it.
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _send(send: Send, response: _Response) -> None:
    body = b"" if response.body is None else json.dumps(response.body).encode()
    headers = [(b"content-type", _CONTENT_TYPE.encode())] if response.body is not None else []
    headers += [(key.encode(), value.encode()) for key, value in response.headers]
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _list(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:ListResponse"],
        "totalResults": len(resources),
        "startIndex": 1,
        "itemsPerPage": len(resources),
        "Resources": resources,
    }


def _schema(base_url: str) -> dict[str, Any]:
    schema = mapping.user_schema()
    schema["meta"] = {"resourceType": "Schema", "location": f"{base_url}/Schemas/{mapping.USER_SCHEMA}"}
    return schema


def _resource_type(base_url: str) -> dict[str, Any]:
    resource_type = ResourceType.model_validate(
        {
            "id": "User",
            "name": "User",
            "endpoint": "/Users",
            "description": "User accounts",
            "schema": mapping.USER_SCHEMA,
        }
    )
    dumped = resource_type.model_dump(mode="json")
    dumped["meta"] = {"resourceType": "ResourceType", "location": f"{base_url}/ResourceTypes/User"}
    return dumped


def _service_provider_config(base_url: str) -> dict[str, Any]:
    config = ServiceProviderConfig.model_validate(
        {
            "patch": {"supported": True},
            "bulk": {"supported": False, "maxOperations": 0, "maxPayloadSize": 0},
            "filter": {"supported": True, "maxResults": MAX_COUNT},
            "changePassword": {"supported": False},
            "sort": {"supported": False},
            "etag": {"supported": True},
            "authenticationSchemes": [
                {
                    "type": "oauthbearertoken",
                    "name": "OAuth Bearer Token",
                    "description": "A bearer token that the access table admits to the calls made (docs/scim.md)",
                    "primary": True,
                }
            ],
        }
    )
    dumped = config.model_dump(mode="json")
    dumped["meta"] = {"resourceType": "ServiceProviderConfig", "location": f"{base_url}/ServiceProviderConfig"}
    return dumped


def _first_error(invalid: ValidationError) -> str:
    first = invalid.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid"))
