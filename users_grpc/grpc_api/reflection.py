"""Server reflection that serves the contract with its comments.

grpcio-reflection answers with descriptors copied out of a descriptor pool, and a pool keeps no
source info: ``grpcurl describe`` would show the RPCs without their "Callers" and "Errors" lines.
So .ci/generate writes the descriptor set with ``--include_source_info`` beside the generated
code (users/v1/descriptors.binpb), and the files it holds are served as written there.

The error details every refusal carries (google.rpc.ErrorInfo, BadRequest, RetryInfo) travel
in ``google.protobuf.Any``; the contract never imports their file, so it is added here from
googleapis-common-protos, the package that encodes them: without it grpcurl prints each detail
as "is not recognized" and a base64 blob instead of its reason.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable
from importlib import resources
from typing import Any, cast

from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha._async import ReflectionServicer

DESCRIPTOR_SET = "descriptors.binpb"


def load_descriptor_set() -> descriptor_pb2.FileDescriptorSet:
    """The contract's files and their imports, with source info, as .ci/generate wrote them."""
    data = resources.files("users.v1").joinpath(DESCRIPTOR_SET).read_bytes()
    files = descriptor_pb2.FileDescriptorSet.FromString(data)
    return _with_file_and_imports(files, error_details_pb2.DESCRIPTOR)


def _with_file_and_imports(
    files: descriptor_pb2.FileDescriptorSet, file: descriptor.FileDescriptor
) -> descriptor_pb2.FileDescriptorSet:
    """The set, plus ``file`` and its imports that it does not hold yet (imports first, as
    protoc orders a set)."""
    held = {proto.name for proto in files.file}
    for dependency in file.dependencies:
        files = _with_file_and_imports(files, dependency)
    if file.name not in held:
        file.CopyToProto(files.file.add())
    return files


class SourceInfoReflectionServicer(ReflectionServicer):
    """Reflection that answers for the contract's files with their stored bytes (comments
    included), and leaves everything else (health, reflection itself, list_services) to
    grpcio-reflection."""

    def __init__(self, service_names: Iterable[str], files: descriptor_pb2.FileDescriptorSet) -> None:
        files = _without_json_names(files)
        pool = descriptor_pool.DescriptorPool()
        for file in files.file:
            pool.Add(file)
        for other in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
            pool.AddSerializedFile(other.serialized_pb)
        super().__init__(service_names, pool=pool)
        self._files = {file.name: file for file in files.file}
        # Looked up here, not in the pool: the pool finds no methods (grpcurl describe
        # users.v1.UserService.EnableMfa) nor fields.
        self._symbols = _symbols(files)

    # types-grpcio-reflection declares the base's an `async def` returning an iterable (a
    # coroutine, to mypy); it is an async generator, as this one is.
    async def ServerReflectionInfo(  # type: ignore[override]
        self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest], unused_context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async for request in request_iterator:
            filename = None
            if request.HasField("file_by_filename"):
                filename = request.file_by_filename if request.file_by_filename in self._files else None
            elif request.HasField("file_containing_symbol"):
                filename = self._symbols.get(request.file_containing_symbol)
            if filename is not None:
                yield self._response(filename, request)
            else:
                answers = cast(
                    AsyncIterable[reflection_pb2.ServerReflectionResponse],
                    super().ServerReflectionInfo(_one(request), unused_context),
                )
                async for response in answers:
                    yield response

    def _response(
        self, filename: str, request: reflection_pb2.ServerReflectionRequest
    ) -> reflection_pb2.ServerReflectionResponse:
        """The file and everything it imports, transitively (all in the set: protoc's --include_imports)."""
        names: list[str] = []
        pending = [filename]
        while pending:
            name = pending.pop()
            if name not in names:
                names.append(name)
                pending.extend(self._files[name].dependency)
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[self._files[name].SerializeToString() for name in names]
            ),
            original_request=request,
        )


async def _one(
    request: reflection_pb2.ServerReflectionRequest,
) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
    yield request


def _without_json_names(files: descriptor_pb2.FileDescriptorSet) -> descriptor_pb2.FileDescriptorSet:
    """The set without the fields' ``json_name``, as reflection served it before.

    protoc writes json_name (lowerCamelCase) into a descriptor set, and grpcurl then prints
    ``accessToken`` where it printed ``access_token``; scripts (the README's among them) read
    the proto names, and grpcurl accepts either form in requests.
    """
    copy = descriptor_pb2.FileDescriptorSet()
    copy.CopyFrom(files)
    pending = [message for file in copy.file for message in file.message_type]
    while pending:
        message = pending.pop()
        for field in message.field:
            field.ClearField("json_name")
        pending.extend(message.nested_type)
    return copy


def _symbols(files: descriptor_pb2.FileDescriptorSet) -> dict[str, str]:
    """Every fully qualified name the set defines (messages, fields, enums and their values,
    services, methods), to the name of the file that defines it."""
    symbols: dict[str, str] = {}
    for file in files.file:
        prefix = f"{file.package}." if file.package else ""

        def enums(scope: str, found: Iterable[descriptor_pb2.EnumDescriptorProto], filename: str = file.name) -> None:
            for enum in found:
                symbols[scope + enum.name] = filename
                # Enum values are siblings of their enum (C++ scoping rules).
                symbols.update((scope + value.name, filename) for value in enum.value)

        pending = [(prefix, message) for message in file.message_type]
        while pending:
            scope, message = pending.pop()
            name = scope + message.name
            symbols[name] = file.name
            symbols.update((f"{name}.{field.name}", file.name) for field in message.field)
            symbols.update((f"{name}.{oneof.name}", file.name) for oneof in message.oneof_decl)
            enums(f"{name}.", message.enum_type)
            pending.extend((f"{name}.", nested) for nested in message.nested_type)
        enums(prefix, file.enum_type)
        for service in file.service:
            symbols[prefix + service.name] = file.name
            symbols.update((f"{prefix}{service.name}.{method.name}", file.name) for method in service.method)
    return symbols
