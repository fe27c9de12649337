"""The domain: types, rules, errors and the ports the services need.

Imports nothing of users_grpc outside domain/, and no grpc, protobuf, pymongo or generated code
(pyproject.toml [tool.importlinter]; docs/architecture.md).
"""
