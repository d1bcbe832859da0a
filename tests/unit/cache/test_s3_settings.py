"""Where the object store is: s3:// locations, endpoint and region from the AWS variables
and the profile's config file, in the AWS SDK's order."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from regproxy.cache.s3.multipart import MIN_PART, part_size_for
from regproxy.cache.s3.settings import (
    StoreLocation,
    StoreLocationError,
    endpoint_of,
    region_of,
)


def test_location_parses_bucket_and_prefix() -> None:
    assert StoreLocation.parse("s3://bucket") == StoreLocation("bucket", "")
    assert StoreLocation.parse("s3://bucket/") == StoreLocation("bucket", "")
    assert StoreLocation.parse("s3://my.bucket/a/b/") == StoreLocation("my.bucket", "a/b/")
    assert str(StoreLocation.parse("s3://bucket/cache")) == "s3://bucket/cache/"


@pytest.mark.parametrize(
    "text",
    [
        "bucket/x",
        "http://bucket/x",
        "s3://",
        "s3://ab",
        "s3://b_ucket",
        "s3://u@bucket/x",
        "s3://bucket/x?y=1",
        "s3://bucket/x#f",
    ],
)
def test_location_refuses(text: str) -> None:
    with pytest.raises(StoreLocationError):
        StoreLocation.parse(text)


_SEGMENT = st.text("abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=10)


@given(
    st.text("abcdefghijklmnopqrstuvwxyz0123456789-", min_size=3, max_size=20),
    st.lists(_SEGMENT, max_size=4),
)
def test_location_round_trips(bucket: str, segments: list[str]) -> None:
    prefix = "/".join(segments)
    parsed = StoreLocation.parse(f"s3://{bucket}/{prefix}")
    assert parsed.bucket == bucket
    assert parsed.prefix == (prefix + "/" if prefix else "")
    assert StoreLocation.parse(str(parsed)) == parsed


def _config(tmp_path: Path, text: str) -> dict[str, str]:
    path = tmp_path / "config"
    path.write_text(text)
    return {"AWS_CONFIG_FILE": str(path)}


def test_endpoint_order(tmp_path: Path) -> None:
    env = _config(tmp_path, "[default]\nendpoint_url = http://from-config:9000\n")
    assert endpoint_of(env, "eu-west-1") == "http://from-config:9000"
    env["AWS_ENDPOINT_URL"] = "http://general:1"
    assert endpoint_of(env, "eu-west-1") == "http://general:1"
    env["AWS_ENDPOINT_URL_S3"] = "https://s3-only:2/"
    assert endpoint_of(env, "eu-west-1") == "https://s3-only:2"
    assert endpoint_of({"AWS_CONFIG_FILE": "/nonexistent"}, "eu-west-1") == (
        "https://s3.eu-west-1.amazonaws.com"
    )


@pytest.mark.parametrize("endpoint", ["ftp://x", "http://x/path", "http://", "x:9000"])
def test_endpoint_refuses(endpoint: str) -> None:
    with pytest.raises(StoreLocationError):
        endpoint_of({"AWS_ENDPOINT_URL": endpoint, "AWS_CONFIG_FILE": "/nonexistent"}, "r")


def test_region_order_and_profiles(tmp_path: Path) -> None:
    env = _config(
        tmp_path, "[default]\nregion = eu-north-1\n[profile other]\nregion = ap-south-1\n"
    )
    assert region_of(env) == "eu-north-1"
    assert region_of({**env, "AWS_PROFILE": "other"}) == "ap-south-1"
    assert region_of({**env, "AWS_PROFILE": "missing"}) == "us-east-1"
    assert region_of({**env, "AWS_DEFAULT_REGION": "x-1"}) == "x-1"
    assert region_of({**env, "AWS_DEFAULT_REGION": "x-1", "AWS_REGION": "y-2"}) == "y-2"


def test_part_sizes_fit_ten_thousand_parts() -> None:
    assert part_size_for(None) == MIN_PART
    assert part_size_for(10) == MIN_PART
    assert part_size_for(None, 1) == MIN_PART  # never below S3's minimum
    huge = 200 * 1024**3
    assert -(-huge // part_size_for(huge)) <= 10_000
