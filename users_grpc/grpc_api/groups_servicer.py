"""The gRPC face of :class:`~users_grpc.services.groups.GroupService`: the group RPCs of
users.v1.UserService, mixed into :class:`~users_grpc.grpc_api.servicer.UserServiceServicer`."""

from __future__ import annotations

import grpc

from users.v1 import group_pb2
from users_grpc.domain.groups import Group, GroupMember
from users_grpc.grpc_api.convert import _timestamp
from users_grpc.pipeline.current import current_caller
from users_grpc.services.groups import GroupService

Context = grpc.aio.ServicerContext[object, object]


class GroupRpcs:
    """The group RPCs; the servicer sets ``_groups``."""

    _groups: GroupService

    async def CreateGroup(
        self, request: group_pb2.CreateGroupRequest, context: Context
    ) -> group_pb2.CreateGroupResponse:
        group = await self._groups.create(request.name, caller=current_caller.get())
        return group_pb2.CreateGroupResponse(group=group_to_proto(group))

    async def RenameGroup(
        self, request: group_pb2.RenameGroupRequest, context: Context
    ) -> group_pb2.RenameGroupResponse:
        group = await self._groups.rename(request.group_id, request.name)
        return group_pb2.RenameGroupResponse(group=group_to_proto(group))

    async def DeleteGroup(
        self, request: group_pb2.DeleteGroupRequest, context: Context
    ) -> group_pb2.DeleteGroupResponse:
        await self._groups.delete(request.group_id, caller=current_caller.get())
        return group_pb2.DeleteGroupResponse()

    async def ListGroups(self, request: group_pb2.ListGroupsRequest, context: Context) -> group_pb2.ListGroupsResponse:
        groups, next_page_token = await self._groups.list_groups(request.page_size, request.page_token)
        return group_pb2.ListGroupsResponse(groups=[group_to_proto(g) for g in groups], next_page_token=next_page_token)

    async def AddGroupMember(
        self, request: group_pb2.AddGroupMemberRequest, context: Context
    ) -> group_pb2.AddGroupMemberResponse:
        member = await self._groups.add_member(request.group_id, request.user_id)
        return group_pb2.AddGroupMemberResponse(member=member_to_proto(member))

    async def RemoveGroupMember(
        self, request: group_pb2.RemoveGroupMemberRequest, context: Context
    ) -> group_pb2.RemoveGroupMemberResponse:
        await self._groups.remove_member(request.group_id, request.user_id)
        return group_pb2.RemoveGroupMemberResponse()

    async def ListGroupMembers(
        self, request: group_pb2.ListGroupMembersRequest, context: Context
    ) -> group_pb2.ListGroupMembersResponse:
        members, next_page_token = await self._groups.members(request.group_id, request.page_size, request.page_token)
        return group_pb2.ListGroupMembersResponse(
            members=[member_to_proto(m) for m in members], next_page_token=next_page_token
        )

    async def ListUserGroups(
        self, request: group_pb2.ListUserGroupsRequest, context: Context
    ) -> group_pb2.ListUserGroupsResponse:
        groups, next_page_token = await self._groups.groups_of(request.user_id, request.page_size, request.page_token)
        return group_pb2.ListUserGroupsResponse(
            groups=[group_to_proto(g) for g in groups], next_page_token=next_page_token
        )


def group_to_proto(group: Group) -> group_pb2.Group:
    return group_pb2.Group(
        id=group.id,
        name=group.name,
        create_time=_timestamp(group.created_at),
        update_time=_timestamp(group.updated_at),
    )


def member_to_proto(member: GroupMember) -> group_pb2.GroupMember:
    return group_pb2.GroupMember(user_id=member.user_id, create_time=_timestamp(member.created_at))
