"""The gRPC face of :class:`~users_grpc.services.service_account_tokens.ServiceAccountTokenService`:
the service-account token RPCs of users.v1.UserService, mixed into
:class:`~users_grpc.grpc_api.servicer.UserServiceServicer`."""

from __future__ import annotations

from datetime import UTC

import grpc

from users.v1 import service_account_token_pb2 as pb
from users_grpc.domain.service_account_tokens import ServiceAccountToken
from users_grpc.grpc_api.convert import _timestamp
from users_grpc.pipeline.current import current_caller
from users_grpc.services.service_account_tokens import ServiceAccountTokenService
from users_grpc.services.service_accounts import ServiceAccountService

Context = grpc.aio.ServicerContext[object, object]


class ServiceAccountTokenRpcs:
    """The token RPCs; the servicer sets ``_service_accounts``, whose ``account_tokens`` they call."""

    _service_accounts: ServiceAccountService

    async def CreateServiceAccountToken(
        self, request: pb.CreateServiceAccountTokenRequest, context: Context
    ) -> pb.CreateServiceAccountTokenResponse:
        expires_at = request.expire_time.ToDatetime(UTC) if request.HasField("expire_time") else None
        token, secret = await self._tokens().create(
            request.service_account_id, request.display_name, expires_at, caller=current_caller.get()
        )
        return pb.CreateServiceAccountTokenResponse(service_account_token=token_to_proto(token), token=secret)

    async def ListServiceAccountTokens(
        self, request: pb.ListServiceAccountTokensRequest, context: Context
    ) -> pb.ListServiceAccountTokensResponse:
        tokens = await self._tokens().list(request.service_account_id)
        return pb.ListServiceAccountTokensResponse(service_account_tokens=[token_to_proto(t) for t in tokens])

    async def RevokeServiceAccountToken(
        self, request: pb.RevokeServiceAccountTokenRequest, context: Context
    ) -> pb.RevokeServiceAccountTokenResponse:
        await self._tokens().revoke(request.service_account_id, request.token_id, caller=current_caller.get())
        return pb.RevokeServiceAccountTokenResponse()

    def _tokens(self) -> ServiceAccountTokenService:
        tokens = self._service_accounts.account_tokens
        if tokens is None:
            raise RuntimeError("no service-account token service wired")  # bootstrap.py always wires one
        return tokens


def token_to_proto(token: ServiceAccountToken) -> pb.ServiceAccountToken:
    """A token's record; never its secret or digest (the domain object holds neither)."""
    message = pb.ServiceAccountToken(
        id=token.id,
        service_account_id=token.service_account_id,
        display_name=token.display_name,
        create_time=_timestamp(token.created_at),
    )
    if token.expires_at is not None:
        message.expire_time.CopyFrom(_timestamp(token.expires_at))
    if token.last_used_at is not None:
        message.last_use_time.CopyFrom(_timestamp(token.last_used_at))
    return message
