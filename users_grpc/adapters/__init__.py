"""The edges to the world the services reach through ports: MongoDB, bcrypt, mail, secrets at rest.

They implement domain ports and never import services or grpc_api (docs/architecture.md).
"""
