"""TLS and mTLS with certificates made at test time; machine callers identified by certificate."""

from __future__ import annotations

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.support.calls import rpc_error
from tests.support.pki import Pki, channel_credentials, issue, tls_settings
from tests.support.servers import ADMIN_PASSWORD, StartServer
from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc


def _public_call(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    channel = grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    with channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        try:
            stub.GetPublicKeys(pb.GetPublicKeysRequest(), timeout=5)
        except grpc.RpcError as error:
            code: grpc.StatusCode = error.code()
            return code
    return grpc.StatusCode.OK


def test_tls_serves_tls_clients_and_refuses_plaintext(start_server: StartServer, pki: Pki) -> None:
    server = start_server(credentials=channel_credentials(pki, None), **tls_settings(pki, mutual=False))
    assert _public_call(server.address, channel_credentials(pki, None)) == grpc.StatusCode.OK
    assert _public_call(server.address, None) == grpc.StatusCode.UNAVAILABLE


def test_mtls_refuses_clients_without_a_trusted_certificate(start_server: StartServer, pki: Pki) -> None:
    server = start_server(credentials=channel_credentials(pki, pki.billing), **tls_settings(pki, mutual=True))
    assert _public_call(server.address, channel_credentials(pki, pki.billing)) == grpc.StatusCode.OK
    assert _public_call(server.address, channel_credentials(pki, None)) == grpc.StatusCode.UNAVAILABLE
    assert _public_call(server.address, channel_credentials(pki, pki.rogue)) == grpc.StatusCode.UNAVAILABLE
    assert _public_call(server.address, None) == grpc.StatusCode.UNAVAILABLE


def test_a_listed_certificate_makes_a_machine_caller(start_server: StartServer, pki: Pki) -> None:
    """billing-service checks credentials with no token; another certificate of the same CA may not."""
    server = start_server(credentials=channel_credentials(pki, pki.billing), **tls_settings(pki, mutual=True))
    # server.anonymous sends no token, but its channel presents billing-service's certificate.
    check = pb.VerifyCredentialsRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
    assert server.anonymous.VerifyCredentials(check).user.username == server.admin_username
    claims = server.anonymous.ValidateToken(pb.ValidateTokenRequest(access_token=server.admin_token)).claims
    assert claims.subject == server.anonymous.VerifyCredentials(check).user.id
    with grpc.secure_channel(server.address, channel_credentials(pki, pki.stranger)) as channel:
        stranger = user_service_pb2_grpc.UserServiceStub(channel)
        assert rpc_error(stranger.VerifyCredentials, check).code() == grpc.StatusCode.UNAUTHENTICATED
    # A machine caller is no admin: admin-only RPCs stay closed to it.
    request = pb.DeleteUserByIdentifierRequest(identifier="nobody")
    assert rpc_error(server.anonymous.DeleteUserByIdentifier, request).code() == grpc.StatusCode.PERMISSION_DENIED


SPIFFE_ID = "spiffe://example.org/ns/prod/sa/billing"
# What each client certificate (common name, subject alternative names) proves under the setting
# USERS_MACHINE_IDENTITIES=billing-service,<SPIFFE_ID>: only URI and DNS SANs count.
IDENTITY_CASES: dict[str, tuple[str, list[x509.GeneralName], bool]] = {
    "dns-san": ("other1", [x509.DNSName("billing-service")], True),
    "uri-san": ("other2", [x509.UniformResourceIdentifier(SPIFFE_ID)], True),
    "email-san": ("other3", [x509.RFC822Name("billing-service")], False),
    "common-name-only": ("billing-service", [x509.DNSName("other4")], False),
    "spiffe-id-as-common-name": (SPIFFE_ID, [x509.DNSName("other5")], False),
}


@pytest.mark.parametrize("case", IDENTITY_CASES)
def test_only_uri_and_dns_names_make_a_machine_caller(start_server: StartServer, pki: Pki, case: str) -> None:
    common_name, alternative_names, is_machine = IDENTITY_CASES[case]
    ca_key = serialization.load_pem_private_key(pki.ca.key, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_name = x509.load_pem_x509_certificate(pki.ca.cert).subject
    client, _, _ = issue(common_name, (ca_name, ca_key), alternative_names=alternative_names)
    settings = {
        **tls_settings(pki, mutual=True),
        "machine_identities": frozenset({"billing-service", SPIFFE_ID}),
    }
    server = start_server(credentials=channel_credentials(pki, pki.billing), **settings)
    check = pb.VerifyCredentialsRequest(identifier=server.admin_username, password=ADMIN_PASSWORD)
    with grpc.secure_channel(server.address, channel_credentials(pki, client)) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        if is_machine:
            assert stub.VerifyCredentials(check).user.username == server.admin_username
        else:
            assert rpc_error(stub.VerifyCredentials, check).code() == grpc.StatusCode.UNAUTHENTICATED
