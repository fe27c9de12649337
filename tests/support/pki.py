"""Certificates made at test time, for TLS tests: a CA and the certificates it signs, and the
channel credentials and server settings that use them, and the ``pki`` fixture."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass
class Issued:
    key: bytes
    cert: bytes


def issue(
    name: str,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    alternative_names: list[x509.GeneralName] | None = None,
) -> tuple[Issued, x509.Name, ec.EllipticCurvePrivateKey]:
    """A certificate with common name ``name``; unless ``alternative_names`` says otherwise,
    its SANs are the DNS name ``name`` and 127.0.0.1."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        if alternative_names is None:
            alternative_names = [x509.DNSName(name), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return Issued(pem_key, cert.public_bytes(serialization.Encoding.PEM)), subject, key


@dataclass
class Pki:
    ca: Issued
    server: Issued
    billing: Issued  # a client the server knows as a machine caller
    stranger: Issued  # signed by the same CA, but not a machine caller
    rogue: Issued  # signed by a CA the server does not trust
    directory: Path


def make_pki(directory: Path) -> Pki:
    """A CA, the server's certificate and three clients'; the CA's and the server's files in ``directory``."""
    ca, ca_name, ca_key = issue("test-ca", None, ca=True)
    server, _, _ = issue("localhost", (ca_name, ca_key))
    billing, _, _ = issue("billing-service", (ca_name, ca_key))
    stranger, _, _ = issue("stranger-service", (ca_name, ca_key))
    _, rogue_ca_name, rogue_ca_key = issue("rogue-ca", None, ca=True)
    rogue, _, _ = issue("billing-service", (rogue_ca_name, rogue_ca_key))
    (directory / "ca.pem").write_bytes(ca.cert)
    (directory / "server.pem").write_bytes(server.cert)
    (directory / "server.key").write_bytes(server.key)
    return Pki(ca, server, billing, stranger, rogue, directory)


def channel_credentials(pki: Pki, client: Issued | None) -> grpc.ChannelCredentials:
    if client is None:
        return grpc.ssl_channel_credentials(root_certificates=pki.ca.cert)
    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.cert, private_key=client.key, certificate_chain=client.cert
    )


def tls_settings(pki: Pki, *, mutual: bool) -> dict[str, object]:
    settings: dict[str, object] = {
        "tls_cert_file": pki.directory / "server.pem",
        "tls_key_file": pki.directory / "server.key",
        "machine_identities": frozenset({"billing-service"}),
    }
    if mutual:
        settings["tls_client_ca_file"] = pki.directory / "ca.pem"
    return settings


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Certificates for TLS and mTLS servers and their clients, one set per module."""
    return make_pki(tmp_path_factory.mktemp("pki"))
