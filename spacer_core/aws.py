"""boto3 sessions and S3 resources built from spacer_core.config."""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
import botocore
from botocore.config import Config as BotoConfig

from spacer_core import config

_THREAD_LOCAL = threading.local()

# An S3 endpoint that stops answering must fail a call within seconds, not
# hang a worker thread: boto's defaults are 60 s per connect and per read
# and 5 attempts. With these, a refused connection fails in about a second
# and a silent endpoint in at most S3_MAX_ATTEMPTS x (connect or read
# timeout); the error becomes StorageUnavailableError (gRPC UNAVAILABLE).
# "standard" retry mode retries throttling and 5xx answers with jittered backoff.
S3_CONNECT_TIMEOUT_S = 5.0
S3_READ_TIMEOUT_S = 30.0
S3_MAX_ATTEMPTS = 3


def create_aws_session() -> boto3.Session:
    """A boto3 session using the configured credentials or profile (None = boto's own chain)."""
    return boto3.Session(
        aws_access_key_id=config.AWS_ACCESS_KEY_ID,
        aws_secret_access_key=config.AWS_SECRET_ACCESS_KEY,
        aws_session_token=config.AWS_SESSION_TOKEN,
        profile_name=config.AWS_PROFILE_NAME,
    )


def _settings_key() -> tuple[Any, ...]:
    return (
        config.AWS_ACCESS_KEY_ID,
        config.AWS_SECRET_ACCESS_KEY,
        config.AWS_SESSION_TOKEN,
        config.AWS_PROFILE_NAME,
        config.AWS_ANONYMOUS,
        config.AWS_REGION,
        config.AWS_ENDPOINT_URL,
    )


def create_aws_resource(service_name: str, region: str | None = None) -> Any:
    """A boto3 resource honouring AWS_ANONYMOUS, AWS_REGION and AWS_ENDPOINT_URL, with bounded timeouts."""
    boto_config = BotoConfig(
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        read_timeout=S3_READ_TIMEOUT_S,
        retries={"max_attempts": S3_MAX_ATTEMPTS, "mode": "standard"},
    )
    if config.AWS_ANONYMOUS:
        boto_config = boto_config.merge(BotoConfig(signature_version=botocore.UNSIGNED))
    return create_aws_session().resource(
        service_name,
        region_name=region or config.AWS_REGION,
        endpoint_url=config.AWS_ENDPOINT_URL,
        config=boto_config,
    )


def get_s3_resource() -> Any:
    """This thread's S3 resource, rebuilt whenever the AWS settings change.

    boto3 resources are not thread-safe, so each thread keeps its own.
    """
    key = _settings_key()
    cached = getattr(_THREAD_LOCAL, "s3", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    resource = create_aws_resource("s3")
    _THREAD_LOCAL.s3 = (key, resource)
    return resource


def aws_check() -> None:
    """Print which AWS settings are present (never their values), then who S3 calls run as.

    The lines are pyspacer's, word for word (people and scripts read them);
    AWS_ENDPOINT_URL, a setting pyspacer lacks, gets a line only when set.
    The identity lookup (STS GetCallerIdentity) goes over the network; its
    errors propagate unchanged, as boto's messages explain its auth chain best.
    """
    if config.AWS_ANONYMOUS:
        print("AWS_ANONYMOUS has been set to True, so AWS will be accessed without credentials.")
        return
    settings = [
        ("Spacer config - AWS_PROFILE_NAME (highest priority if specified)", config.AWS_PROFILE_NAME),
        ("Environment var - AWS_CONFIG_FILE", os.getenv("AWS_CONFIG_FILE")),
        ("Environment var - AWS_SHARED_CREDENTIALS_FILE", os.getenv("AWS_SHARED_CREDENTIALS_FILE")),
        ("Spacer config - AWS_ACCESS_KEY_ID", config.AWS_ACCESS_KEY_ID),
        ("Spacer config - AWS_SECRET_ACCESS_KEY", config.AWS_SECRET_ACCESS_KEY),
        ("Spacer config - AWS_SESSION_TOKEN", config.AWS_SESSION_TOKEN),
    ]
    if config.AWS_ENDPOINT_URL:
        settings.append(("Spacer config - AWS_ENDPOINT_URL", config.AWS_ENDPOINT_URL))
    print("Variables that have been set:")
    for description, value in settings:
        print(f"{description}: {'Yes' if value else 'No'}")
    print("Will now call create_aws_session()...")
    session = create_aws_session()
    print("Will now call get_caller_identity()...")
    identity = session.client(
        "sts", region_name=config.AWS_REGION, endpoint_url=config.AWS_ENDPOINT_URL
    ).get_caller_identity()
    print(f"Identified as ARN: {identity['Arn']}")
