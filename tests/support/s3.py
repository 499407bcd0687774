"""S3 for tests: moto's HTTP server on 127.0.0.1, with spacer_core pointed at it.

Use in a test module (the fixtures are registered in tests/conftest.py)::

    def test_something(s3_bucket):
        loc = DataLocation("s3", "some/key", bucket_name=s3_bucket)

``moto_server`` (session scope) is the endpoint URL of one server shared by
the session. ``s3_bucket`` (function scope) creates a fresh, empty bucket and,
for the duration of the test, sets spacer_core.config's AWS settings plus the
matching ``SPACER_*`` and ``AWS_*`` environment variables, so that code in
this process and subprocesses started by the test (for example a server
started with ``os.environ``) reach the same store. ``s3_env(endpoint)`` gives
those variables for building a subprocess environment by hand.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from spacer_core import config

REGION = "us-east-1"
# moto accepts any credentials; fixed fake ones keep boto3 from looking for real ones.
ACCESS_KEY = "testing-access-key"
SECRET_KEY = "testing-secret-key"

_bucket_numbers = itertools.count()


def s3_env(endpoint: str) -> dict[str, str]:
    """Environment variables that point spacer_core (and plain boto3) at ``endpoint``."""
    return {
        "SPACER_AWS_ENDPOINT_URL": endpoint,
        "SPACER_AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "SPACER_AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "SPACER_AWS_REGION": REGION,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ENDPOINT_URL": endpoint,
    }


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """Start moto's server on a free loopback port; yield its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def use_endpoint(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point spacer_core.config and the environment at ``endpoint`` until the test ends."""
    for name, value in s3_env(endpoint).items():
        monkeypatch.setenv(name, value)
    for name in (
        "SPACER_AWS_SESSION_TOKEN",
        "SPACER_AWS_PROFILE_NAME",
        "SPACER_AWS_ANONYMOUS",
        "AWS_PROFILE",
    ):
        monkeypatch.delenv(name, raising=False)
    settings = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_SESSION_TOKEN": None,
        "AWS_PROFILE_NAME": None,
        "AWS_REGION": REGION,
        "AWS_ANONYMOUS": False,
    }
    for name, value in settings.items():
        monkeypatch.setattr(config, name, value)


def s3_client(endpoint: str) -> Any:
    """A plain boto3 S3 client on ``endpoint`` (fake credentials)."""
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new empty bucket on the moto server; spacer_core configured to use it."""
    use_endpoint(monkeypatch, moto_server)
    bucket = f"spacer-test-{next(_bucket_numbers)}"
    client = s3_client(moto_server)
    client.create_bucket(Bucket=bucket)
    yield bucket
    # Empty and drop the bucket so the shared server does not grow.
    listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
    for obj in listed:
        client.delete_object(Bucket=bucket, Key=obj["Key"])
    client.delete_bucket(Bucket=bucket)
