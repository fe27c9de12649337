"""What a call's metadata says: its headers by name, the bearer token, and where it comes from."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def source_address(peer: str, forwarded_for: str | None, *, machine: bool) -> str:
    """Where a call comes from, for throttles and logs.

    ``peer`` is gRPC's peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``, ``unix:...``).
    ``x-forwarded-for`` is honoured from machine callers only, who sign users in on their
    behalf: anyone else could name any address and so dodge a per-source limit. Its last entry
    counts: the address the machine caller itself saw. Gateways such as Envoy append that to
    whatever the client sent, so the entries before it are the client's word and could name
    any address.
    """
    if machine and forwarded_for:
        last = forwarded_for.rsplit(",", 1)[-1].strip()
        if last:
            return _one_source(last)
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0]
    if kind == "ipv6":
        return _one_source(rest.rpartition(":")[0].strip("[]"))
    return peer


def _one_source(address: str) -> str:
    """An IPv6 address stands for its /64: one subscriber usually holds a whole /64, and counting
    each of its addresses apart would let one host appear as billions of sources. An IPv4 address
    mapped into IPv6 is that IPv4 address."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return str(parsed.ipv4_mapped)
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return str(parsed)


def metadata_value(metadata: Iterable[tuple[str, str | bytes]], name: str) -> str | None:
    for key, value in metadata:
        if key == name and isinstance(value, str):
            return value
    return None


def bearer_token(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header; "" for a malformed header."""
    for key, value in metadata:
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None
