"""The SCIM app served over real HTTP (uvicorn, on the test server's own loop) until the HTTP
edge mounts it: requests go through App.invoke, the pipeline every HTTP call takes."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn

from tests.support.servers import RunningServer
from users_grpc.scim.app import ScimApp


@contextmanager
def scim_base_url(server: RunningServer) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:PORT/scim/v2``) of the server's SCIM app, while it runs."""
    listener = socket.create_server(("127.0.0.1", 0))  # bound and listening before uvicorn runs: no wait
    port = listener.getsockname()[1]
    config = uvicorn.Config(ScimApp(server.app.invoke), lifespan="off", log_level="warning", access_log=False)
    http = uvicorn.Server(config)
    running = server.submit(http.serve(sockets=[listener]))
    try:
        yield f"http://127.0.0.1:{port}/scim/v2"
    finally:
        http.should_exit = True
        running.result(timeout=30)
        listener.close()
