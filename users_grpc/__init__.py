"""users-grpc: user accounts over gRPC (``users.v1.UserService``) on MongoDB.

The layers, outside in (docs/architecture.md; pyproject.toml [tool.importlinter] checks them)::

    bootstrap.py   the composition root: builds the stores, the services and the server
    grpc_api/      gRPC requests -> service calls -> gRPC replies; access rules, interceptors, the error table
    adapters/      MongoDB (BSON stays there), bcrypt, mail transports, secrets at rest
    services/      the use cases, on domain types and ports only
    domain/        types, rules, the error tree and the ports; no gRPC, protobuf or PyMongo
"""

__all__: list[str] = []
