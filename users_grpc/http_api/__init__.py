"""The HTTP edge (``USERS_HTTP_ADDRESS``): /metrics, the key set, Connect, gRPC-Web and JSON, and
the mounts beside them (SCIM), on uvicorn."""
