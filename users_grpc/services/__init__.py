"""The use cases, on domain types and ports only: no grpc, protobuf, pymongo or generated code.

See docs/architecture.md.
"""
