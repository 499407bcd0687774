"""TLS, mutual TLS and bearer tokens on a real server, with certificates made here."""

from __future__ import annotations

import argparse
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server._proto.spacer.v1 import spacer_pb2 as pb
from server.client import SpacerClient, tls_credentials
from server.config import add_arguments, config_from_args
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
