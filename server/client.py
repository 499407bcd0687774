"""A small typed client for the spacer.v1.Spacer gRPC service.

    from server.client import SpacerClient

    with SpacerClient("127.0.0.1:50051") as client:
        result = client.classify_image(extractor, [(100, 200)], "photo.jpg", classifier_loc)
        for item in client.classify_images(client.image_request(...) for ...):
            ...

Several replicas: give a list of addresses or a `dns:///host:port` target
(a Kubernetes headless Service); calls are spread round-robin over every
address, and idempotent calls that meet UNAVAILABLE (a replica stopping or
gone) are retried on another one:

    SpacerClient(["10.0.0.5:50051", "10.0.0.6:50051"])
    SpacerClient("dns:///spacer.default.svc.cluster.local:50051")

Extractors and locations may be given as spacer_core objects (anything with
`serialize()`), pyspacer JSON dicts or the protobuf messages. Images may be
paths or bytes (sent inline) or locations the server reads itself.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server._proto.spacer.v1 import spacer_pb2 as pb
from server._proto.spacer.v1 import spacer_pb2_grpc as pb_grpc

MIB = 1024 * 1024
LocationLike = pb.DataLocation | Mapping[str, Any] | Any
ExtractorLike = pb.Extractor | Mapping[str, Any] | Any
ImageLike = bytes | str | os.PathLike | LocationLike

__all__ = [
    "SpacerClient",
    "pb",
    "to_location",
    "to_extractor",
    "service_config",
    "channel_target",
    "tls_credentials",
]

SERVICE = "spacer.v1.Spacer"
# Calls that may run twice without harm: reads, and writes of the same bytes
# to the same place (atomic replace). Training, RunJob and the ClassifyImages
# stream are not retried by the channel.
IDEMPOTENT_METHODS = ("ExtractFeatures", "ClassifyFeatures", "ClassifyImage", "LoadModel", "ListModels")


def service_config(max_attempts: int = 5) -> dict[str, Any]:
    """gRPC service config: round_robin over every resolved address, retries on UNAVAILABLE.

    UNAVAILABLE means the call never ran to completion on a replica (refused,
    connection lost, server draining), so it is safe to run it on another.
    """
    if not 2 <= max_attempts <= 5:
        raise ValueError(f"max_attempts must be in 2..5 (gRPC's limit), got {max_attempts}")
    return {
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [
            {
                "name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS]
                + [{"service": "grpc.health.v1.Health", "method": "Check"}],
                "retryPolicy": {
                    "maxAttempts": max_attempts,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
    }


def _ip_literal(host: str) -> str:
    """host as an IP literal; names are resolved once, here."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve address {host!r}: {exc}") from None
    return str(infos[0][4][0])


def channel_target(address: str | Sequence[str]) -> str:
    """A gRPC target for one address, a `scheme:` target, or several host:port addresses.

    Several addresses become one `ipv4:`/`ipv6:` target listing them all, which
    round_robin balances over; host names in the list are resolved once.
    """
    if isinstance(address, str):
        return address
    addresses = list(address)
    if not addresses:
        raise ValueError("give at least one address")
    if len(addresses) == 1:
        return addresses[0]
    hosts: list[tuple[str, str]] = []
    for item in addresses:
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit() or "://" in item:
            raise ValueError(f"address must look like host:port, got {item!r}")
        hosts.append((_ip_literal(host.strip("[]")), port))
    families = {ipaddress.ip_address(h).version for h, _ in hosts}
    if families == {4}:
        return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts)
    if families == {6}:
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts)
    raise ValueError(f"addresses mix IPv4 and IPv6, which one channel cannot balance: {addresses}")


def tls_credentials(
    ca: str | os.PathLike | None = None,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files.

    ``ca`` verifies the server (default: the system's roots); ``cert`` and
    ``key`` are this client's certificate for a server that requires mutual TLS.
    """

    def read(path: str | os.PathLike | None) -> bytes | None:
        return Path(path).read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(read(ca), read(key), read(cert))


class _BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds 'authorization: Bearer <token>' to every call."""

    def __init__(self, token: str):
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=[*(details.metadata or ()), self._header])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _as_dict(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    if hasattr(value, "serialize"):
        return value.serialize()
    raise TypeError(f"expected a dict or an object with serialize(), got {type(value).__name__}")


def to_location(value: LocationLike) -> pb.DataLocation:
    """A DataLocation message from a proto, a pyspacer JSON dict or a DataLocation."""
    if isinstance(value, pb.DataLocation):
        return value
    data = _as_dict(value)
    return pb.DataLocation(
        storage_type=data["storage_type"], key=data["key"], bucket_name=data.get("bucket_name") or ""
    )


def to_extractor(value: ExtractorLike) -> pb.Extractor:
    """An Extractor message from a proto, pyspacer JSON or a FeatureExtractor."""
    if isinstance(value, pb.Extractor):
        return value
    data = _as_dict(value)
    return pb.Extractor(
        class_path=data["class_path"],
        data_locations={k: to_location(v) for k, v in data.get("data_locations", {}).items()},
        data_hashes=dict(data.get("data_hashes", {})),
    )


def _image_fields(image: ImageLike) -> dict[str, Any]:
    """image_bytes for bytes/paths (read here), image_loc for locations."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return {"image_bytes": bytes(image)}
    if isinstance(image, (str, os.PathLike)):
        return {"image_bytes": Path(image).read_bytes()}
    return {"image_loc": to_location(image)}


def _rowcols(rowcols: Iterable[Sequence[int]]) -> list[pb.RowCol]:
    return [pb.RowCol(row=int(r), col=int(c)) for r, c in rowcols]


class SpacerClient:
    """Blocking client; one channel, reused by every call. Errors raise grpc.RpcError.

    `address`: "host:port", a list of them, or any gRPC target ("dns:///name:port").
    Calls are balanced round-robin; idempotent ones are retried on UNAVAILABLE up
    to `max_attempts` times in all (see `service_config`).
    """

    def __init__(
        self,
        address: str | Sequence[str] = "127.0.0.1:50051",
        *,
        max_message_bytes: int = 64 * MIB,
        timeout: float | None = None,
        max_attempts: int = 5,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        server_name: str | None = None,
    ):
        """``credentials`` (see tls_credentials) makes the channel TLS; ``token``
        is sent as a bearer token; ``server_name`` overrides the name the
        server's certificate is checked against."""
        self.address = address
        self.target = channel_target(address)
        self.timeout = timeout
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", json.dumps(service_config(max_attempts))),
        ]
        if server_name is not None:
            options.append(("grpc.ssl_target_name_override", server_name))
        if credentials is not None:
            self.channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(self.target, options=options)
        if token is not None:
            self.channel = grpc.intercept_channel(self.channel, _BearerToken(token))
        self.stub = pb_grpc.SpacerStub(self.channel)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SpacerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    # ------------------------------------------------------------ requests

    @staticmethod
    def image_request(
        extractor: ExtractorLike,
        rowcols: Iterable[Sequence[int]],
        image: ImageLike,
        classifier_loc: LocationLike,
        job_token: str = "",
    ) -> pb.ClassifyImageRequest:
        """A ClassifyImageRequest (for classify_image or the classify_images stream)."""
        return pb.ClassifyImageRequest(
            job_token=job_token,
            extractor=to_extractor(extractor),
            rowcols=_rowcols(rowcols),
            classifier_loc=to_location(classifier_loc),
            **_image_fields(image),
        )

    # ------------------------------------------------------------ RPCs

    def extract_features(
        self,
        extractor: ExtractorLike,
        rowcols: Iterable[Sequence[int]],
        image: ImageLike,
        feature_loc: LocationLike | None = None,
        *,
        return_features: bool = False,
        job_token: str = "",
        timeout: float | None = None,
    ) -> pb.ExtractFeaturesResponse:
        request = pb.ExtractFeaturesRequest(
            job_token=job_token,
            extractor=to_extractor(extractor),
            rowcols=_rowcols(rowcols),
            feature_loc=to_location(feature_loc) if feature_loc is not None else None,
            return_features=return_features,
            **_image_fields(image),
        )
        return self.stub.ExtractFeatures(request, timeout=self._timeout(timeout))

    def classify_features(
        self,
        feature_loc: LocationLike,
        classifier_loc: LocationLike,
        *,
        job_token: str = "",
        timeout: float | None = None,
    ) -> pb.ClassifyResponse:
        request = pb.ClassifyFeaturesRequest(
            job_token=job_token,
            feature_loc=to_location(feature_loc),
            classifier_loc=to_location(classifier_loc),
        )
        return self.stub.ClassifyFeatures(request, timeout=self._timeout(timeout))

    def classify_image(
        self,
        extractor: ExtractorLike,
        rowcols: Iterable[Sequence[int]],
        image: ImageLike,
        classifier_loc: LocationLike,
        *,
        job_token: str = "",
        timeout: float | None = None,
    ) -> pb.ClassifyResponse:
        request = self.image_request(extractor, rowcols, image, classifier_loc, job_token)
        return self.stub.ClassifyImage(request, timeout=self._timeout(timeout))

    def classify_images(
        self, requests: Iterable[pb.ClassifyImageRequest], *, timeout: float | None = None
    ) -> Iterator[pb.ClassifyImagesResponse]:
        """Stream requests; yields one response per request as each finishes.

        Responses may come out of order: match them by job_token. A response
        with `error` set is a failed image; the stream continues.
        """
        return self.stub.ClassifyImages(iter(requests), timeout=self._timeout(timeout))

    def train_classifier(
        self, request: pb.TrainClassifierRequest, *, timeout: float | None = None
    ) -> Iterator[pb.TrainClassifierResponse]:
        """Yields progress events, then the result."""
        return self.stub.TrainClassifier(request, timeout=self._timeout(timeout))

    def run_job(self, job_msg: Any, *, timeout: float | None = None) -> dict[str, Any]:
        """Run a pyspacer JobMsg (object, dict or JSON text); returns the JobReturnMsg JSON dict."""
        text = job_msg if isinstance(job_msg, str) else json.dumps(_as_dict(job_msg))
        response = self.stub.RunJob(pb.RunJobRequest(job_msg_json=text), timeout=self._timeout(timeout))
        return json.loads(response.job_return_msg_json)

    def load_model(
        self,
        *,
        extractor: ExtractorLike | None = None,
        classifier_loc: LocationLike | None = None,
        timeout: float | None = None,
    ) -> pb.LoadedModel:
        if (extractor is None) == (classifier_loc is None):
            raise ValueError("give exactly one of extractor and classifier_loc")
        request = (
            pb.LoadModelRequest(extractor=to_extractor(extractor))
            if extractor is not None
            else pb.LoadModelRequest(classifier_loc=to_location(classifier_loc))
        )
        return self.stub.LoadModel(request, timeout=self._timeout(timeout))

    def list_models(self, *, timeout: float | None = None) -> list[pb.LoadedModel]:
        response = self.stub.ListModels(pb.ListModelsRequest(), timeout=self._timeout(timeout))
        return list(response.models)

    def health(self, service: str = "spacer.v1.Spacer", *, timeout: float | None = None) -> str:
        """'SERVING' or 'NOT_SERVING' (raises grpc.RpcError when unreachable)."""
        response = self._health.Check(
            health_pb2.HealthCheckRequest(service=service), timeout=self._timeout(timeout)
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
