"""Ports for the tests' servers: bound once (port 0, read back), never picked free and bound later."""

from __future__ import annotations

import gc
import socket
import warnings


def free_port() -> int:
    """A port that was free a moment ago. Racy (another process may bind it before the caller
    does): prefer :func:`bound_socket`, or binding port 0 and reading the port back."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bound_socket() -> socket.socket:
    """A TCP socket bound to a port of its own on 127.0.0.1, not listening: connections to it are
    refused (a dead server) until it is handed to :class:`SocketController`, which listens on it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def port_of(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


def collect_known_leaks() -> None:
    """Collect sockets a third-party component is known to leave open, here, where the cause is
    known, rather than let their ResourceWarning fail whichever test the garbage collector hits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
