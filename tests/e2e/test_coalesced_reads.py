"""Concurrent reads of users by id go to the database as one find (USERS_COALESCE_READS; the
batching itself: tests/unit/test_read_batches.py), and a change stored before a read is always
seen by it."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import grpc
from bson import ObjectId
from pymongo import MongoClient

from tests.support.calls import signed_up
from tests.support.commands import CommandRecorder
from tests.support.mail import MailSink
from tests.support.servers import RunningServer, StartServer
from users.v1 import user_service_pb2 as pb
from users_grpc.http_api.invoke import HttpCall

GET_USER = "/users.v1.UserService/GetUser"
# Background work far apart, so that only the calls themselves talk to the database.
QUIET = {
    "health_interval_seconds": 300.0,
    "mail_poll_seconds": 300.0,
    "housekeeping_interval_seconds": 3600.0,
    "key_reload_seconds": 3600.0,
}


def copies_of_the_admin(server: RunningServer, count: int) -> list[str]:
    """``count`` users stored beside the admin (copies of its document, names changed)."""
    client: MongoClient[dict[str, Any]] = MongoClient(server.settings.mongodb_uri)
    with client:
        users = client[server.settings.mongodb_database].users
        template = users.find_one({"_id": ObjectId(server.admin_id)})
        assert template is not None
        copies = [
            template | {"_id": ObjectId(), "username": f"copy{n}", "username_key": f"copy{n}"} for n in range(count)
        ]
        users.insert_many(copies)
    return [str(copy["_id"]) for copy in copies]


def get_users_at_once(server: RunningServer, ids: Sequence[str]) -> list[Any]:
    """GetUser of each of ``ids`` as the admin, all started in the same turn of the server's loop
    (through the call pipeline the HTTP edge uses, interceptors and access rules included)."""
    call = HttpCall(metadata=(("authorization", f"Bearer {server.admin_token}"),), peer="ipv4:127.0.0.1:5555")

    async def all_at_once() -> list[Any]:
        return await asyncio.gather(*(server.app.invoke(GET_USER, pb.GetUserRequest(id=i), call) for i in ids))

    return server.call(all_at_once())


def user_finds(recorder: CommandRecorder) -> list[Any]:
    return [c.document["filter"] for c in recorder.commands if c.in_call and c.document["find"] == "users"]


def test_concurrent_get_users_are_one_find_of_the_admin_and_one_of_the_users(start_server: StartServer) -> None:
    recorder = CommandRecorder(names={"find"})
    server = start_server(event_listeners=[recorder], **QUIET)
    ids = copies_of_the_admin(server, 5)
    get_users_at_once(server, ids[:1])  # the token's first use checks its signature too

    recorder.clear()
    replies = get_users_at_once(server, [*ids, *ids])  # each of them twice

    assert [reply.user.id for reply in replies] == [*ids, *ids]
    assert user_finds(recorder) == [
        {"_id": ObjectId(server.admin_id), "deleting": None},  # the token's check, once for all ten
        {"_id": {"$in": [ObjectId(i) for i in ids]}, "deleting": None},  # the users, each once
    ]


def test_without_coalescing_each_read_is_a_find(start_server: StartServer) -> None:
    recorder = CommandRecorder(names={"find"})
    server = start_server(event_listeners=[recorder], coalesce_reads=False, **QUIET)
    ids = copies_of_the_admin(server, 3)
    get_users_at_once(server, ids[:1])

    recorder.clear()
    get_users_at_once(server, ids)

    assert len(user_finds(recorder)) == 2 * len(ids)


def test_a_deactivation_is_seen_by_every_call_after_it_while_calls_run(
    start_server: StartServer, mail: MailSink
) -> None:
    server = start_server(**QUIET)
    jane = signed_up(server, mail)
    stub = server.stub_for(jane.access_token)
    request = pb.GetUserRequest(id=jane.user.id)
    in_flight = [stub.GetUser.future(request) for _ in range(20)]  # batches being read meanwhile

    server.stub.DeactivateUser(pb.DeactivateUserRequest(user_id=jane.user.id))

    after = [stub.GetUser.future(request) for _ in range(20)]
    assert [refused(call) for call in after] == [grpc.StatusCode.UNAUTHENTICATED] * len(after)
    # Read before the deactivation or after it: either answer, nothing else.
    assert {refused(call) for call in in_flight} <= {None, grpc.StatusCode.UNAUTHENTICATED}


def refused(call: Any) -> grpc.StatusCode | None:
    """The status a call's future ended with, None if it succeeded."""
    error = call.exception()
    return None if error is None else error.code()
