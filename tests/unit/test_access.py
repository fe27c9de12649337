"""The access rules without a server: reading the bearer token, identifying and admitting callers."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest

from users.v1 import user_service_pb2 as pb
from users_grpc.domain.errors import PermissionDenied, Unauthenticated
from users_grpc.domain.model import ANONYMOUS, AccessClaims, Caller, Gender, Role, User, UserState
from users_grpc.grpc_api.access import (
    FLOWS,
    RULES,
    Authorizer,
    Rule,
    _admits,
)
from users_grpc.grpc_api.reflection import load_descriptor_set
from users_grpc.pipeline.current import stream_admission
from users_grpc.pipeline.metadata import bearer_token, metadata_value, source_address
from users_grpc.services.service_accounts import ServiceAccountService
from users_grpc.services.sessions import SessionService
from users_grpc.services.throttling import Flow, RateLimitPolicy

ALICE = Caller(user_id="a" * 24, role=Role.USER)
ADMIN = Caller(user_id="b" * 24, role=Role.ADMIN)
BILLING = Caller(machine="billing-service")


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ([], None),
        ([("x-request-id", "1")], None),
        ([("authorization", "Bearer abc.def.ghi")], "abc.def.ghi"),
        ([("authorization", "bearer  abc ")], "abc"),
        ([("authorization", "Basic dXNlcjpwYXNz")], ""),  # present but not a bearer token: refused, not ignored
        ([("authorization", "Bearer")], ""),
    ],
)
def test_bearer_token(metadata: list[tuple[str, str]], token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_a_header_is_read_by_name_and_only_as_text() -> None:
    metadata: list[tuple[str, str | bytes]] = [
        ("x-request-id", "1"),
        ("x-forwarded-for-bin", b"\x01"),
        ("x-forwarded-for", "203.0.113.9"),
    ]
    assert metadata_value(metadata, "x-forwarded-for") == "203.0.113.9"
    assert metadata_value(metadata, "x-forwarded-for-bin") is None  # binary headers are not addresses
    assert metadata_value(metadata, "authorization") is None


@pytest.mark.parametrize(
    ("rule", "caller", "admitted"),
    [
        (Rule.SELF, ALICE, True),
        (Rule.SELF, ADMIN, False),
        (Rule.SELF, BILLING, False),
        (Rule.SELF_OR_ADMIN, ADMIN, True),
        (Rule.SELF_OR_ADMIN, BILLING, False),
        (Rule.SELF_ADMIN_OR_MACHINE, BILLING, True),
        (Rule.ADMIN_OR_MACHINE, ALICE, False),
        (Rule.ADMIN, BILLING, False),
        (Rule.ADMIN, ADMIN, True),
    ],
)
def test_rules_about_alices_record(rule: Rule, caller: Caller, admitted: bool) -> None:
    assert _admits(rule, caller, subject=ALICE.user_id) is admitted


def test_self_needs_the_request_to_name_the_caller() -> None:
    assert not _admits(Rule.SELF_OR_ADMIN, ALICE, subject="c" * 24)
    assert not _admits(Rule.SELF, ALICE, subject=None)


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "machine", "source"),
    [
        ("ipv4:127.0.0.2:50123", None, False, "127.0.0.2"),
        ("ipv6:[::1]:50123", None, False, "::/64"),
        ("ipv6:[2001:db8:1:2:aaaa::5]:50123", None, False, "2001:db8:1:2::/64"),  # one /64, one source
        ("ipv6:[::ffff:192.0.2.7]:50123", None, False, "192.0.2.7"),
        ("ipv4:10.0.0.5:1", "2001:db8:1:2:bbbb::9", True, "2001:db8:1:2::/64"),
        ("ipv4:10.0.0.5:1", "203.0.113.9", False, "10.0.0.5"),  # only machine callers may name another address
        ("ipv4:10.0.0.5:1", "198.51.100.66, 203.0.113.9", True, "203.0.113.9"),  # the hop it saw
        ("ipv4:10.0.0.5:1", " ", True, "10.0.0.5"),
        ("unix:/tmp/socket", None, False, "unix:/tmp/socket"),
    ],
)
def test_source_address(peer: str, forwarded_for: str | None, machine: bool, source: str) -> None:
    assert source_address(peer, forwarded_for, machine=machine) == source


BOB_ID = "c" * 24


@pytest.mark.parametrize(
    ("rule", "admitted"),
    [
        # Callers: Alice on her own record, Alice on Bob's, an admin on Alice's, a machine on Alice's.
        (Rule.SELF, (True, False, False, False)),
        (Rule.SELF_OR_ADMIN, (True, False, True, False)),
        (Rule.SELF_ADMIN_OR_MACHINE, (True, False, True, True)),
        (Rule.ADMIN_OR_MACHINE, (False, False, True, True)),
        (Rule.ADMIN, (False, False, True, False)),
    ],
)
def test_each_rule_admits_exactly_its_callers(rule: Rule, admitted: tuple[bool, bool, bool, bool]) -> None:
    got = (
        _admits(rule, ALICE, subject=ALICE.user_id),
        _admits(rule, ALICE, subject=BOB_ID),
        _admits(rule, ADMIN, subject=ALICE.user_id),
        _admits(rule, BILLING, subject=ALICE.user_id),
    )
    assert got == admitted


def test_a_caller_without_a_user_is_nobodys_self() -> None:
    """A machine or anonymous caller is not "self" of a request that names no user."""
    assert not _admits(Rule.SELF, BILLING, subject=None)
    assert not _admits(Rule.SELF_OR_ADMIN, Caller(), subject=None)


@pytest.mark.parametrize(
    ("forwarded_for", "source"),
    [
        ("10.0.0.7, 203.0.113.9 ", "203.0.113.9"),  # the last entry; spaces around it do not count
        ("203.0.113.9,", "10.0.0.5"),  # an empty last entry names nobody: the peer counts
        ("::ffff:198.51.100.4", "198.51.100.4"),
        ("not-an-address", "not-an-address"),
        ("x" * 100, "x" * 64),  # not an address: kept, but only its first 64 characters
    ],
)
def test_a_machine_callers_forwarded_address_is_the_source(forwarded_for: str, source: str) -> None:
    assert source_address("ipv4:10.0.0.5:1", forwarded_for, machine=True) == source


NOW = datetime(2026, 1, 1, tzinfo=UTC)
ALICE_USER = User(
    id="a" * 24,  # ALICE's
    username="alice",
    first_name="Alice",
    last_name="Liddell",
    email="alice@example.test",
    gender=Gender.FEMALE,
    role=Role.USER,
    state=UserState.ACTIVE,
    created_at=NOW,
    updated_at=NOW,
)
ALICES_TOKEN = "alices.access.token"  # a stand-in the fake sessions accept
REPORTING = Caller(machine="service-account:reporting", service_account_id="client-1")


def _service_token(subject: str) -> str:
    """A token shaped like a service account's; only the fake checks it."""
    payload = base64.urlsafe_b64encode(json.dumps({"sub": subject}).encode()).decode().rstrip("=")
    return f"header.{payload}.signature"


REPORTINGS_TOKEN = _service_token("service-account:client-1")


class _Sessions:
    async def check_access_token(self, access_token: str) -> tuple[AccessClaims, User]:
        if access_token != ALICES_TOKEN:
            raise Unauthenticated("invalid access token")
        claims = AccessClaims(
            subject=ALICE_USER.id,
            role=Role.USER,
            token_version=0,
            session_id="d" * 24,
            token_id="t1",
            issuer="users-grpc",
            audience="users-grpc",
            issued_at=NOW,
            expires_at=NOW + timedelta(minutes=15),
        )
        return claims, ALICE_USER


class _ServiceAccounts:
    async def caller_of(self, access_token: str) -> Caller:
        if access_token != REPORTINGS_TOKEN:
            raise Unauthenticated("invalid access token")
        return REPORTING


def _authorizer(machine_identities: Iterable[str] = ("spiffe://corp/billing",)) -> Authorizer:
    return Authorizer(
        sessions=cast(SessionService, _Sessions()),
        service_accounts=cast(ServiceAccountService, _ServiceAccounts()),
        machine_identities=machine_identities,
    )


def _caller_of(method: str, token: str | None, peer_identities: Iterable[str] = ()) -> Caller:
    return asyncio.run(_authorizer().caller_of(method, token, peer_identities))


def test_a_users_access_token_identifies_the_user_their_role_and_session() -> None:
    caller = _caller_of("GetUser", ALICES_TOKEN)
    assert (caller.user_id, caller.role, caller.session_id) == (ALICE_USER.id, Role.USER, "d" * 24)
    assert caller.machine is None
    assert caller.user == ALICE_USER  # the account read to check the token, for the call to reuse


def test_a_service_accounts_token_identifies_its_machine_caller() -> None:
    assert _caller_of("GetUser", REPORTINGS_TOKEN) == REPORTING


def test_a_listed_certificate_identity_is_a_machine_caller() -> None:
    caller = _caller_of("GetUser", None, ["spiffe://corp/unknown", "spiffe://corp/billing"])
    assert caller == Caller(machine="spiffe://corp/billing")


def test_an_unlisted_certificate_identity_is_anonymous() -> None:
    assert _caller_of("GetUser", None, ["spiffe://corp/unknown"]) == ANONYMOUS
    assert _caller_of("GetUser", None) == ANONYMOUS


def test_a_bearer_token_decides_even_over_a_listed_certificate() -> None:
    assert _caller_of("GetUser", ALICES_TOKEN, ["spiffe://corp/billing"]).user_id == ALICE_USER.id
    with pytest.raises(Unauthenticated):
        _caller_of("GetUser", "forged", ["spiffe://corp/billing"])


@pytest.mark.parametrize("token", ["forged", "", _service_token("service-account:deleted")])
def test_a_bad_token_is_unauthenticated_where_the_rule_needs_a_caller(token: str) -> None:
    with pytest.raises(Unauthenticated):
        _caller_of("GetUser", token)


@pytest.mark.parametrize("token", ["forged", "", _service_token("service-account:deleted")])
def test_a_bad_token_is_ignored_where_anyone_may_call(token: str) -> None:
    """Clients attach stale tokens to every call; a call open to anyone goes ahead anonymously."""
    assert _caller_of("RefreshSession", token) == ANONYMOUS


def test_a_good_token_still_identifies_the_caller_where_anyone_may_call() -> None:
    assert _caller_of("Authenticate", ALICES_TOKEN).user_id == ALICE_USER.id


def test_a_listed_certificate_identifies_a_machine_caller_where_anyone_may_call() -> None:
    """A machine signing users in is known as one, so the end user's forwarded address counts."""
    assert _caller_of("Authenticate", None, ["spiffe://corp/billing"]) == Caller(machine="spiffe://corp/billing")
    assert _caller_of("Authenticate", None) == ANONYMOUS


def test_every_rpc_anyone_may_call_belongs_to_exactly_one_flow() -> None:
    """Over the service descriptor: an RPC anyone may call without a flow (and so without its
    flow's per-source budget) fails here, as does a flow named for an RPC that needs a caller."""
    methods = {method.name for method in pb.DESCRIPTOR.services_by_name["UserService"].methods}
    anonymous = {method for method in methods if RULES.get(method) is Rule.ANYONE}
    assert set(FLOWS) == anonymous
    assert all(isinstance(FLOWS[method], Flow) for method in anonymous)  # one flow each: a mapping's value


def test_the_calls_that_cost_a_hash_or_a_mail_are_in_a_budgeted_flow() -> None:
    budgeted = {method for method, flow in FLOWS.items() if flow in RateLimitPolicy().budgets}
    assert budgeted == {
        "CreateUser",
        "ActivateUser",
        "ResendActivationCode",
        "Authenticate",
        "StartPasskeySignIn",
        "FinishPasskeySignIn",
        "IssueServiceToken",
        "ForgotPassword",
        "ResetPassword",
    }
    assert {FLOWS[method] for method in budgeted} == {Flow.SIGN_UP, Flow.ACTIVATION, Flow.SIGN_IN, Flow.RECOVERY}


def test_a_method_without_a_rule_is_refused_whoever_calls() -> None:
    """Fail closed: a new RPC without a line in RULES is nobody's."""
    assert "Shutdown" not in RULES
    with pytest.raises(PermissionDenied) as identifying:
        _caller_of("Shutdown", ALICES_TOKEN)
    with pytest.raises(PermissionDenied) as admitting:
        _authorizer().admit("Shutdown", pb.GetUserRequest(), ADMIN)
    # The status message says why, so that whoever added the RPC finds the missing rule.
    assert str(identifying.value) == str(admitting.value) == "no access rule covers this method"


@pytest.mark.parametrize(
    "request_",
    [pb.GetUserRequest(id=ALICE_USER.id), pb.ListSessionsRequest(user_id=ALICE_USER.id)],
    ids=["id", "user_id"],
)
def test_the_user_a_request_names_by_id_or_user_id_is_the_subject(request_: object) -> None:
    method = type(request_).__name__.removesuffix("Request")
    _authorizer().admit(method, request_, ALICE)  # Alice about herself: admitted
    with pytest.raises(PermissionDenied):
        _authorizer().admit(method, request_, Caller(user_id=BOB_ID, role=Role.USER))


def test_a_request_about_another_user_is_refused_to_a_user() -> None:
    with pytest.raises(PermissionDenied):
        _authorizer().admit("UpdateUser", pb.UpdateUserRequest(user_id=BOB_ID), ALICE)
    _authorizer().admit("UpdateUser", pb.UpdateUserRequest(user_id=BOB_ID), ADMIN)


def test_an_anonymous_caller_is_unauthenticated_where_the_rule_needs_a_caller() -> None:
    with pytest.raises(Unauthenticated):
        _authorizer().admit("GetUser", pb.GetUserRequest(id=ALICE_USER.id), ANONYMOUS)


def test_a_machine_caller_is_not_unauthenticated() -> None:
    """A machine has no user id but is known: refused by the rule (PERMISSION_DENIED), or admitted."""
    with pytest.raises(PermissionDenied):
        _authorizer().admit("DeleteUser", pb.DeleteUserRequest(id=ALICE_USER.id), BILLING)
    _authorizer().admit("GetUser", pb.GetUserRequest(id=ALICE_USER.id), BILLING)


def test_anyone_may_make_a_call_open_to_anyone() -> None:
    _authorizer().admit("Authenticate", pb.AuthenticateRequest(), ANONYMOUS)


def test_a_streams_admission_run_again_is_the_same_rule_with_the_same_credentials() -> None:
    """What the change feed runs at each poll: identified and admitted again, as a new call would be."""
    watch = pb.WatchUserChangesRequest()
    asyncio.run(_authorizer().readmit("WatchUserChanges", watch, REPORTINGS_TOKEN, ()))
    asyncio.run(_authorizer().readmit("WatchUserChanges", watch, None, ["spiffe://corp/billing"]))
    with pytest.raises(PermissionDenied):  # a user's token: not admin's nor a machine's
        asyncio.run(_authorizer().readmit("WatchUserChanges", watch, ALICES_TOKEN, ()))
    for token in ("forged", _service_token("service-account:deleted")):
        with pytest.raises(Unauthenticated):
            asyncio.run(_authorizer().readmit("WatchUserChanges", watch, token, ()))


def test_a_stream_nobody_admitted_is_refused_at_its_first_poll() -> None:
    """Fail closed: the admission to run again is the interceptor's to set; unset, it refuses."""

    async def first_poll() -> None:
        await stream_admission.get()()

    with pytest.raises(PermissionDenied):
        asyncio.run(first_poll())


# Who the "Callers" line of an RPC's proto comment names, as the set of its terms, and the rule
# that admits exactly them. "anyone holding the token" (or the secret) is anyone, to the access
# rules: the service checks what they hold.
STATED_CALLERS: dict[frozenset[str], Rule] = {
    frozenset({"anyone"}): Rule.ANYONE,
    frozenset({"the user themself"}): Rule.SELF,
    frozenset({"the user themself", "an admin"}): Rule.SELF_OR_ADMIN,
    frozenset({"the user themself", "an admin", "a machine caller"}): Rule.SELF_ADMIN_OR_MACHINE,
    frozenset({"an admin", "a machine caller"}): Rule.ADMIN_OR_MACHINE,
    frozenset({"an admin"}): Rule.ADMIN,
    frozenset({"an admin", "a provisioning service account"}): Rule.ADMIN_OR_PROVISIONER,
    frozenset({"the user themself", "an admin", "a provisioning service account"}): Rule.SELF_ADMIN_OR_PROVISIONER,
}


def stated_callers(text: str) -> frozenset[str]:
    """The terms of a "Callers: ..." statement: "the user themself, an admin or a machine caller"."""
    terms = re.split(r",\s*|\s+or\s+", " ".join(text.split()))
    return frozenset("anyone" if term.startswith("anyone holding ") else term for term in terms)


def method_comments() -> dict[str, str]:
    """Each UserService method's leading comment, from the descriptor set the server serves by
    reflection (it keeps the comments; the compiled modules do not)."""
    files = {file.name: file for file in load_descriptor_set().file}
    file = files["users/v1/user_service.proto"]
    [service_index] = [i for i, service in enumerate(file.service) if service.name == "UserService"]
    comments = {
        tuple(location.path): location.leading_comments
        for location in file.source_code_info.location
        if location.leading_comments
    }
    # A location path: 6 (FileDescriptorProto.service), the service's index, 2 (.method), the method's index.
    return {
        method.name: comments.get((6, service_index, 2, index), "")
        for index, method in enumerate(file.service[service_index].method)
    }


def test_the_proto_comments_state_every_rpcs_access_rule_as_the_table_has_it() -> None:
    """A "Callers:" statement in each RPC's comment, up to its first "." or ";", names who may call
    it; the table's rule for the RPC admits exactly them. A new RPC without the statement, a
    statement no rule matches, or a rule widened or narrowed in one place only fails here."""
    comments = method_comments()
    assert set(comments) == {method.name for method in pb.DESCRIPTOR.services_by_name["UserService"].methods}
    assert set(RULES) == set(comments)
    for method, comment in comments.items():
        statements = re.findall(r"Callers:\s*([^.;]*)", comment)
        assert len(statements) == 1, f"{method}: its comment must state its callers once, as 'Callers: ...'"
        callers = stated_callers(statements[0])
        assert callers in STATED_CALLERS, f"{method}: 'Callers: {statements[0]}' names callers no rule admits"
        assert RULES[method] is STATED_CALLERS[callers], f"{method}: the comment says {statements[0]!r}"


def test_each_rule_describes_the_callers_it_admits_as_the_proto_comments_do() -> None:
    assert {stated_callers(rule.value): rule for rule in Rule} == STATED_CALLERS
