"""The gRPC face of :class:`~users_grpc.service.UserService`.

Each method parses its request, calls the service and converts the result.
Errors are not handled here: the error interceptor maps them to statuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from users.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc
from users_grpc.domain import Gender, Registration, Role, User
from users_grpc.errors import FieldViolation, InvalidArgument
from users_grpc.service import UserService

_GENDERS = {
    user_pb2.GENDER_UNSPECIFIED: Gender.UNSPECIFIED,
    user_pb2.GENDER_MALE: Gender.MALE,
    user_pb2.GENDER_FEMALE: Gender.FEMALE,
    user_pb2.GENDER_OTHER: Gender.OTHER,
}
_GENDERS_TO_PROTO = {domain: wire for wire, domain in _GENDERS.items()}
_ROLES = {
    user_pb2.ROLE_UNSPECIFIED: Role.USER,
    user_pb2.ROLE_USER: Role.USER,
    user_pb2.ROLE_ADMIN: Role.ADMIN,
}
_ROLES_TO_PROTO = {Role.USER: user_pb2.ROLE_USER, Role.ADMIN: user_pb2.ROLE_ADMIN}

_K = TypeVar("_K", bound=int)
_E = TypeVar("_E")

Context = grpc.aio.ServicerContext[object, object]


class UserServiceServicer(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, service: UserService) -> None:
        self._service = service

    async def CreateUser(
        self, request: user_service_pb2.CreateUserRequest, context: Context
    ) -> user_service_pb2.CreateUserResponse:
        user = await self._service.create_user(
            Registration(
                username=request.username,
                first_name=request.first_name,
                last_name=request.last_name,
                email=request.email,
                password=request.password,
                password_confirmation=request.password_confirmation,
                gender=_enum_from_proto(_GENDERS, request.gender, "gender"),
                role=_enum_from_proto(_ROLES, request.role, "role"),
            )
        )
        return user_service_pb2.CreateUserResponse(user=user_to_proto(user))

    async def ActivateUser(
        self, request: user_service_pb2.ActivateUserRequest, context: Context
    ) -> user_service_pb2.ActivateUserResponse:
        user = await self._service.activate_user(request.identifier, request.code)
        return user_service_pb2.ActivateUserResponse(user=user_to_proto(user))

    async def ResendActivationCode(
        self, request: user_service_pb2.ResendActivationCodeRequest, context: Context
    ) -> user_service_pb2.ResendActivationCodeResponse:
        await self._service.resend_activation_code(request.identifier)
        return user_service_pb2.ResendActivationCodeResponse()

    async def GetUser(
        self, request: user_service_pb2.GetUserRequest, context: Context
    ) -> user_service_pb2.GetUserResponse:
        user = await self._service.get_user(request.id)
        return user_service_pb2.GetUserResponse(user=user_to_proto(user))

    async def GetUserByIdentifier(
        self, request: user_service_pb2.GetUserByIdentifierRequest, context: Context
    ) -> user_service_pb2.GetUserByIdentifierResponse:
        user = await self._service.get_active_user_by_identifier(request.identifier)
        return user_service_pb2.GetUserByIdentifierResponse(user=user_to_proto(user))

    async def DeleteUser(
        self, request: user_service_pb2.DeleteUserRequest, context: Context
    ) -> user_service_pb2.DeleteUserResponse:
        await self._service.delete_user(request.id)
        return user_service_pb2.DeleteUserResponse()

    async def DeleteUserByIdentifier(
        self, request: user_service_pb2.DeleteUserByIdentifierRequest, context: Context
    ) -> user_service_pb2.DeleteUserByIdentifierResponse:
        await self._service.delete_user_by_identifier(request.identifier)
        return user_service_pb2.DeleteUserByIdentifierResponse()

    async def VerifyCredentials(
        self, request: user_service_pb2.VerifyCredentialsRequest, context: Context
    ) -> user_service_pb2.VerifyCredentialsResponse:
        user = await self._service.verify_credentials(request.identifier, request.password)
        return user_service_pb2.VerifyCredentialsResponse(user=user_to_proto(user))


def user_to_proto(user: User) -> user_pb2.User:
    return user_pb2.User(
        id=user.id,
        username=user.username,
        first_name=user.first_name,
        last_name=user.last_name,
        email=user.email,
        gender=_GENDERS_TO_PROTO[user.gender],
        role=_ROLES_TO_PROTO[user.role],
        is_active=user.is_active,
        created_at=_timestamp(user.created_at),
        updated_at=_timestamp(user.updated_at),
    )


def _enum_from_proto(values: Mapping[_K, _E], number: _K, field: str) -> _E:
    # proto3 enums are open: an unknown number arrives intact and must be refused.
    try:
        return values[number]
    except KeyError:
        raise InvalidArgument([FieldViolation(field, f"unknown value {number}")]) from None


def _timestamp(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp
