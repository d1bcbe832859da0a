"""Where the store is and who we are there: ``s3://BUCKET/PREFIX``, the endpoint, the region
and the credentials, all from the standard AWS variables and files.

Credentials come from the ``minio`` package's provider chain, used for credentials and
request signing only (treq does the I/O, see ``client``). Why minio and not botocore: the
AWS SDK's core is about 100 MB installed, two thirds of the image's whole budget, for a
client regproxy needs six calls of; minio (MinIO's Python SDK, Apache-2.0, released every
few weeks) is under 1 MB plus pycryptodome, and its ``minio.credentials.providers`` covers
the same sources as the SDK's default chain: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``; the shared credentials file (``AWS_SHARED_CREDENTIALS_FILE``,
``AWS_PROFILE``); web identity (``AWS_WEB_IDENTITY_TOKEN_FILE`` + ``AWS_ROLE_ARN``, i.e. EKS
IRSA and other workload identity federation); ECS/EKS container credentials
(``AWS_CONTAINER_CREDENTIALS_*``); and the EC2 instance metadata service. ``minio.signer``
signs requests and presigns URLs with SigV4, the same code its own client uses against
every S3 implementation it is tested with.

The endpoint: ``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``, else ``endpoint_url`` of
the profile in ``~/.aws/config`` (``AWS_CONFIG_FILE``), else AWS's regional endpoint. The
region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, the profile's ``region``, else us-east-1.
Requests use path-style addressing (``endpoint/bucket/key``), which every implementation
takes (virtual-hosted style needs DNS names per bucket that test set-ups and RGW lack).
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs


class StoreLocationError(ValueError):
    """An ``s3://`` location or endpoint that cannot be used."""


@attrs.frozen
class StoreLocation:
    """``s3://BUCKET/PREFIX``: the bucket, and the key prefix (``""`` or ending in ``/``)."""

    bucket: str
    prefix: str

    @classmethod
    def parse(cls, text: str) -> StoreLocation:
        parts = urlsplit(text)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreLocationError(f"expected s3://BUCKET[/PREFIX], got {text!r}")
        if parts.query or parts.fragment or "@" in parts.netloc:
            raise StoreLocationError(f"s3:// location with a query or user: {text!r}")
        bucket = parts.netloc
        if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in ".-" for c in bucket):
            raise StoreLocationError(f"not a bucket name: {bucket!r}")
        prefix = parts.path.strip("/")
        return cls(bucket, prefix + "/" if prefix else "")

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"


def _profile_config(env: Mapping[str, str]) -> Mapping[str, str]:
    """The profile's section of the AWS config file (``[default]`` or ``[profile NAME]``)."""
    path = env.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config")
    profile = env.get("AWS_PROFILE") or "default"
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error as error:
        raise StoreLocationError(f"{path}: {error}") from error
    section = "default" if profile == "default" else f"profile {profile}"
    return dict(parser[section]) if parser.has_section(section) else {}


def region_of(env: Mapping[str, str]) -> str:
    return (
        env.get("AWS_REGION")
        or env.get("AWS_DEFAULT_REGION")
        or _profile_config(env).get("region")
        or "us-east-1"
    )


def endpoint_of(env: Mapping[str, str], region: str) -> str:
    """The service's base URL, ``scheme://host[:port]`` without a path."""
    endpoint = (
        env.get("AWS_ENDPOINT_URL_S3")
        or env.get("AWS_ENDPOINT_URL")
        or _profile_config(env).get("endpoint_url")
        or f"https://s3.{region}.amazonaws.com"
    )
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise StoreLocationError(f"not an http(s) endpoint: {endpoint!r}")
    if parts.path.strip("/") or parts.query:
        raise StoreLocationError(f"an S3 endpoint has no path: {endpoint!r}")
    return f"{parts.scheme}://{parts.netloc}"


def credential_chain() -> object:
    """minio's provider chain, in the AWS SDK's order: environment, shared credentials
    file, then web identity / container / instance credentials (IamAwsProvider)."""
    from minio.credentials.providers import (
        AWSConfigProvider,
        ChainedProvider,
        EnvAWSProvider,
        IamAwsProvider,
    )

    return ChainedProvider([EnvAWSProvider(), AWSConfigProvider(), IamAwsProvider()])
