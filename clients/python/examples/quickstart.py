"""Signs in, reads the user with the access token, verifies that token locally, and shows the
ErrorInfo reason of a refused call.

    EXAMPLE_PASSWORD=... python examples/quickstart.py localhost:50051 jane

Plaintext, as in the README's walk-through; EXAMPLE_ISSUER and EXAMPLE_AUDIENCE are the
server's USERS_JWT_ISSUER and USERS_JWT_AUDIENCE (default users-grpc).
"""

from __future__ import annotations

import os
import sys

import grpc

from users.v1 import user_service_pb2 as pb
from users.v1 import user_service_pb2_grpc
from users_grpc_client import TokenVerifier, error_reason


def main(address: str, identifier: str) -> None:
    issuer = os.environ.get("EXAMPLE_ISSUER", "users-grpc")
    audience = os.environ.get("EXAMPLE_AUDIENCE", "users-grpc")
    with grpc.insecure_channel(address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        session = stub.Authenticate(
            pb.AuthenticateRequest(identifier=identifier, password=os.environ["EXAMPLE_PASSWORD"]), timeout=30
        )
        print(f"signed in as {session.user.username} ({session.user.id})")

        authorization = (("authorization", f"Bearer {session.access_token}"),)
        user = stub.GetUser(pb.GetUserRequest(user_id=session.user.id), metadata=authorization, timeout=30).user
        print(f"GetUser: {user.username} <{user.email}>")

        claims = TokenVerifier(stub, issuer=issuer, audience=audience).verify(session.access_token)
        print(f"verified locally: sub={claims.subject} role={claims.role} sid={claims.session_id}")

        # Looking users up by name is for admins and machine callers: a user's token is refused.
        try:
            stub.GetUserByIdentifier(
                pb.GetUserByIdentifierRequest(identifier=identifier), metadata=authorization, timeout=30
            )
        except grpc.RpcError as error:
            print(f"refused: code={error.code().name} reason={error_reason(error)}")
        else:
            raise SystemExit("GetUserByIdentifier was not refused")


if __name__ == "__main__":
    main(*sys.argv[1:3])
