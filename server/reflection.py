"""Server reflection under both grpc.reflection.v1 and grpc.reflection.v1alpha.

grpcio-reflection ships only v1alpha, while newer grpcurl and Postman ask v1
first. The two protocols differ only in their package name (same messages,
same field numbers), so the v1 service is the v1alpha servicer registered a
second time under the v1 name, and v1's descriptors are the v1alpha file
renamed, added to the default pool so reflection can describe itself too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_FILE = "grpc/reflection/v1/reflection.proto"
V1_SERVICE_NAME = f"{V1_PACKAGE}.ServerReflection"
SERVICE_NAMES = (V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME)


def _register_v1_descriptors() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old_prefix = f".{proto.package}."
    proto.name = V1_FILE
    proto.package = V1_PACKAGE
    proto.options.Clear()  # the v1alpha file's language options name v1alpha packages
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old_prefix):
                field.type_name = f".{V1_PACKAGE}." + field.type_name[len(old_prefix) :]
    for service in proto.service:
        for method in service.method:
            for attr in ("input_type", "output_type"):
                name = getattr(method, attr)
                if name.startswith(old_prefix):
                    setattr(method, attr, f".{V1_PACKAGE}." + name[len(old_prefix) :])
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection (v1 and v1alpha) listing service_names and both reflection services."""
    _register_v1_descriptors()
    names = tuple(dict.fromkeys((*service_names, *SERVICE_NAMES)))
    servicer = reflection.aio.ReflectionServicer(names)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    for service in SERVICE_NAMES:
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, {"ServerReflectionInfo": handler}),)
        )
