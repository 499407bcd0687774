"""TLS, mutual TLS, bearer tokens and the metrics port on a real server, with certificates made here;
and the small request gates a client meets first (priority values, file keys)."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server import app
from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient, tls_credentials
from server.config import ServerConfig, add_arguments, config_from_args
from spacer_core.data_classes import DataLocation
from spacer_core.testing import make_classifier, make_image
from tests.support.grpc_server import running_server

Code = grpc.StatusCode


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def _issue(folder: Path, stem: str, issuer: tuple | None, *, ca: bool = False, server: bool = False):
    """A certificate (self-signed CA when issuer is None); returns (cert, key, cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    issuer_cert, issuer_key = issuer[:2] if issuer else (None, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .issuer_name(issuer_cert.subject if issuer_cert else _name(stem))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    return (cert, key, *_write(folder, stem, cert, key))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = _issue(folder, "ca", None, ca=True)
    rogue_ca = _issue(folder, "rogue-ca", None, ca=True)
    return {
        "ca": ca,
        "server": _issue(folder, "server", ca, server=True),
        "client": _issue(folder, "client", ca),
        "rogue_ca": rogue_ca,
        "rogue_client": _issue(folder, "rogue-client", rogue_ca),
        "folder": folder,
    }


def _list_models(client: SpacerClient) -> grpc.StatusCode:
    try:
        client.list_models(timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def test_tls_server_talks_only_tls(pki):
    server_cert, server_key = pki["server"][2:]
    with running_server(tls_cert=server_cert, tls_key=server_key) as server:
        with SpacerClient(server.address, credentials=tls_credentials(ca=pki["ca"][2])) as client:
            assert client.health(timeout=10) == "SERVING"
            assert _list_models(client) == Code.OK
        with SpacerClient(server.address) as plain:
            assert _list_models(plain) == Code.UNAVAILABLE
        # A client trusting another CA refuses the server's certificate.
        with SpacerClient(server.address, credentials=tls_credentials(ca=pki["rogue_ca"][2])) as wary:
            assert _list_models(wary) == Code.UNAVAILABLE


def test_mutual_tls_requires_a_client_certificate_from_the_ca(pki):
    server_cert, server_key = pki["server"][2:]
    ca_path = pki["ca"][2]
    with running_server(tls_cert=server_cert, tls_key=server_key, tls_client_ca=ca_path) as server:
        good = tls_credentials(ca=ca_path, cert=pki["client"][2], key=pki["client"][3])
        with SpacerClient(server.address, credentials=good) as client:
            assert _list_models(client) == Code.OK
        anonymous = tls_credentials(ca=ca_path)
        rogue = tls_credentials(ca=ca_path, cert=pki["rogue_client"][2], key=pki["rogue_client"][3])
        for credentials in (anonymous, rogue):
            with SpacerClient(server.address, credentials=credentials) as client:
                assert _list_models(client) == Code.UNAVAILABLE


def test_bearer_token_guards_every_method_but_health(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with running_server(auth_token_file=token_file) as server:
        with SpacerClient(server.address, token="s3cret-token") as client:
            assert _list_models(client) == Code.OK
        for token in (None, "wrong", "s3cret-token-but-longer"):
            with SpacerClient(server.address, token=token) as client:
                assert _list_models(client) == Code.UNAUTHENTICATED
                # Health stays open for load balancers.
                assert client.health(timeout=10) == "SERVING"
                # Streaming methods are guarded too, before any request is read.
                with pytest.raises(grpc.RpcError) as err:
                    list(client.classify_images(iter([pb.ClassifyImageRequest(job_token="x")]), timeout=10))
                assert err.value.code() == Code.UNAUTHENTICATED
                assert err.value.details() == "missing or wrong bearer token"


def test_token_and_tls_together(pki, tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("t0k")
    server_cert, server_key = pki["server"][2:]
    with running_server(tls_cert=server_cert, tls_key=server_key, auth_token_file=token_file) as server:
        credentials = tls_credentials(ca=pki["ca"][2])
        with SpacerClient(server.address, credentials=credentials, token="t0k") as client:
            assert _list_models(client) == Code.OK
        with SpacerClient(server.address, credentials=credentials) as client:
            assert _list_models(client) == Code.UNAUTHENTICATED


def _parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(argv), environ={})


def test_security_flags_and_their_checks(pki, tmp_path):
    cert, key = pki["server"][2:]
    token = tmp_path / "token"
    token.write_text("x")
    config = _parse(["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(pki["ca"][2]),
                     "--auth-token-file", str(token)])  # fmt: skip
    assert (config.tls_cert, config.tls_key, config.tls_client_ca, config.auth_token_file) == (
        cert,
        key,
        pki["ca"][2],
        token,
    )
    assert config.describe()["tls_cert"] == str(cert)
    with pytest.raises(ValueError, match="tls_cert and tls_key must be given together"):
        _parse(["--tls-cert", str(cert)])
    with pytest.raises(ValueError, match="tls_client_ca needs tls_cert"):
        _parse(["--tls-client-ca", str(cert)])
    with pytest.raises(ValueError, match="auth_token_file: no such file"):
        _parse(["--auth-token-file", str(tmp_path / "absent")])
    empty = tmp_path / "empty"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="auth token file .* is empty"):
        with running_server(auth_token_file=empty):
            pass


# ---------------------------------------------------------------- no API enumeration, counted refusals

TOKEN = "s3cret-token"


def _raw(channel: grpc.Channel, method: str, metadata=None) -> grpc.StatusCode:
    call = channel.unary_unary(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
    try:
        call(b"", metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    return Code.OK


def _scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def _rejected(text: str, method: str) -> float:
    found = re.search(
        rf'^spacer_rpc_errors_total{{grpc_code="UNAUTHENTICATED",grpc_method="{method}"}} (\S+)$', text, re.M
    )
    return float(found.group(1)) if found else 0.0


UNKNOWN_METHODS = [
    "/spacer.v1.Spacer/DeleteEverything",
    "/inference.GRPCInferenceService/CudaSharedMemoryRegister",
    "/inference.GRPCInferenceService/TraceSetting",
    "/no.such.Service/Method",
]


def test_without_the_token_every_method_is_unauthenticated_and_counted(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with running_server(auth_token_file=token_file, metrics_port=0) as server:
        port = app.metrics_port(server.server)
        assert port is not None
        before = _scrape(port)[1]
        with grpc.insecure_channel(server.address) as channel:
            # Unknown methods answer as real ones do: nothing tells which exist.
            for method in [*UNKNOWN_METHODS, "/spacer.v1.Spacer/ListModels"]:
                assert _raw(channel, method) == Code.UNAUTHENTICATED, method
            reflection = channel.stream_stream(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                request_serializer=lambda b: b,
                response_deserializer=lambda b: b,
            )
            with pytest.raises(grpc.RpcError) as err:
                list(reflection(iter([b""]), timeout=10))
            assert err.value.code() == Code.UNAUTHENTICATED
            # With the token, an unknown method is what it is.
            good = [("authorization", f"Bearer {TOKEN}")]
            assert _raw(channel, UNKNOWN_METHODS[0], good) == Code.UNIMPLEMENTED
            assert _raw(channel, "/spacer.v1.Spacer/ListModels", good) == Code.OK
        after = _scrape(port)[1]
    assert _rejected(after, "unknown") - _rejected(before, "unknown") == len(UNKNOWN_METHODS)
    assert _rejected(after, "ListModels") - _rejected(before, "ListModels") == 1
    assert _rejected(after, "ServerReflectionInfo") - _rejected(before, "ServerReflectionInfo") == 1
    assert "no.such.Service" not in after and "DeleteEverything" not in after


def test_two_authorization_headers_are_refused(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    right, wrong = ("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer wrong")
    with (
        running_server(auth_token_file=token_file) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        assert _raw(channel, "/spacer.v1.Spacer/ListModels", [right]) == Code.OK
        for headers in ([right, wrong], [wrong, right], [right, right]):
            assert _raw(channel, "/spacer.v1.Spacer/ListModels", headers) == Code.UNAUTHENTICATED


def test_the_metrics_port_serves_metrics_only_and_binds_apart():
    with running_server(metrics_port=0, metrics_host="127.0.0.1", host="127.0.0.1") as server:
        port = app.metrics_port(server.server)
        status, text = _scrape(port)
        assert status == 200 and "spacer_loaded_models" in text
        for path in ("/", "/anything", "/metrics/x", "/favicon.ico"):
            assert _scrape(port, path)[0] == 404, path
    # The default follows the gRPC host (loopback unless told otherwise); the flag sets its own.
    assert ServerConfig().metrics_bind_host == "127.0.0.1"
    assert ServerConfig(host="0.0.0.0").metrics_bind_host == "0.0.0.0"
    assert _parse(["--host", "0.0.0.0", "--metrics-address", "127.0.0.1"]).metrics_bind_host == "127.0.0.1"


# ---------------------------------------------------------------- request gates


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("gates")
    make_image(root / "img.png", 64, 48)
    make_classifier(root / "clf.pkl", feature_dim=16)
    with running_server(data_roots=(root,)) as server, SpacerClient(server.address, timeout=60) as client:
        yield root, client


def test_an_undefined_priority_is_refused_naming_the_field(served):
    root, client = served
    request = client.image_request(
        {"class_path": "spacer.extractors.base.DummyExtractor", "data_locations": {}},
        [(5, 5)],
        DataLocation("filesystem", str(root / "img.png")),
        DataLocation("filesystem", str(root / "clf.pkl")),
        job_token="p",
    )
    request.priority = 99
    with pytest.raises(grpc.RpcError) as err:
        client.stub.ClassifyImage(request, timeout=30)
    assert err.value.code() == Code.INVALID_ARGUMENT
    assert "priority" in err.value.details() and "99" in err.value.details()
    (item,) = client.classify_images([request], timeout=30)
    assert item.error.code_name == "INVALID_ARGUMENT" and "priority" in item.error.message
    # Defined values still pass that gate (and fail, if at all, later for other reasons).
    request.priority = pb.PRIORITY_BULK
    try:
        client.stub.ClassifyImage(request, timeout=60)
    except grpc.RpcError as other:
        assert "priority" not in (other.details() or "")


@pytest.mark.parametrize("suffix", ["/", "/.", "//"])
def test_a_file_key_that_names_a_folder_is_refused(served, suffix):
    root, client = served
    clf = str(root / "clf.pkl")
    assert client.load_model(classifier_loc=DataLocation("filesystem", clf)).kind
    with pytest.raises(grpc.RpcError) as err:
        client.load_model(classifier_loc=DataLocation("filesystem", clf + suffix))
    assert err.value.code() == Code.INVALID_ARGUMENT and "cannot end in '/'" in err.value.details()
    # An output ending in '/' is refused before any work, and nothing is written.
    out = root / "out.featurevector"
    with pytest.raises(grpc.RpcError) as err:
        client.extract_features(
            {"class_path": "spacer.extractors.base.DummyExtractor", "data_locations": {}},
            [(5, 5)],
            DataLocation("filesystem", str(root / "img.png")),
            DataLocation("filesystem", str(out) + suffix),
        )
    assert err.value.code() == Code.INVALID_ARGUMENT and "feature_loc" in err.value.details()
    assert not out.exists()
