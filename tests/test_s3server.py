"""The S3 server the tests start (tests/framework/s3server.py) keeps the promises an S3 store
will rely on when several hosts write into one bucket: create-only and compare-and-swap
writes (conditional PUT), also under contention, ranged GETs, and paged listings.

A real server (SeaweedFS), not a mock of the API; each test gets a new bucket of one server
started for the session.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from botocore.exceptions import ClientError

from tests.framework.s3server import S3Server, boto3_client, race_body, race_puts


def _error_code(call: Callable[[], object]) -> str:
    with pytest.raises(ClientError) as caught:
        call()
    return str(caught.value.response.get("Error", {}).get("Code"))


def test_create_only_put_refuses_an_existing_key(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = boto3_client(s3_server.endpoint)
    s3.put_object(Bucket=s3_bucket, Key="layers/0001/manifest.json", Body=b"first",
                  IfNoneMatch="*")  # fmt: skip
    code = _error_code(
        lambda: s3.put_object(
            Bucket=s3_bucket, Key="layers/0001/manifest.json", Body=b"second", IfNoneMatch="*"
        )
    )
    assert code == "PreconditionFailed"
    body = s3.get_object(Bucket=s3_bucket, Key="layers/0001/manifest.json")["Body"].read()
    assert body == b"first"


def test_put_if_match_replaces_only_the_version_read(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = boto3_client(s3_server.endpoint)
    first = s3.put_object(Bucket=s3_bucket, Key="HEAD", Body=b"v1", IfNoneMatch="*")["ETag"]
    assert s3.head_object(Bucket=s3_bucket, Key="HEAD")["ETag"] == first
    second = s3.put_object(Bucket=s3_bucket, Key="HEAD", Body=b"v2", IfMatch=first)["ETag"]
    assert second != first
    # A writer that read v1 and comes late is refused, and v2 stays.
    assert _error_code(
        lambda: s3.put_object(Bucket=s3_bucket, Key="HEAD", Body=b"v3", IfMatch=first)
    ) == "PreconditionFailed"  # fmt: skip
    assert s3.get_object(Bucket=s3_bucket, Key="HEAD")["Body"].read() == b"v2"
    # If-Match on a key that does not exist never creates it.
    assert _error_code(
        lambda: s3.put_object(Bucket=s3_bucket, Key="absent", Body=b"x", IfMatch=first)
    ) in {"PreconditionFailed", "NoSuchKey", "404"}  # fmt: skip
    assert s3.list_objects_v2(Bucket=s3_bucket, Prefix="absent")["KeyCount"] == 0


@pytest.mark.parametrize("kind", ["create", "replace"])
def test_exactly_one_of_racing_conditional_writers_wins(
    s3_server: S3Server, s3_bucket: str, kind: str
) -> None:
    """Six writers at once, three rounds: one PUT succeeds each round, five get 412.

    (SeaweedFS serialises them with a lock whose waiters retry after about a second, so a
    loser's 412 can take 1-2 s: the rounds are few.)"""
    writers, rounds = 6, 3
    clients = [boto3_client(s3_server.endpoint) for _ in range(writers)]
    for round_no in range(rounds):
        key = f"race/{kind}-{round_no}"
        condition = {"IfNoneMatch": "*"}
        if kind == "replace":
            etag = clients[0].put_object(Bucket=s3_bucket, Key=key, Body=b"base")["ETag"]
            condition = {"IfMatch": etag}
        outcomes = [result for result, _seconds in race_puts(clients, s3_bucket, key, condition)]
        assert outcomes.count("ok") == 1, (round_no, outcomes)
        assert set(outcomes) == {"ok", "PreconditionFailed"}, (round_no, outcomes)
        stored = clients[0].get_object(Bucket=s3_bucket, Key=key)["Body"].read()
        assert stored == race_body(outcomes.index("ok"))


def test_ranged_get_returns_exactly_the_page(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = boto3_client(s3_server.endpoint)
    data = bytes(range(256)) * 64  # 16 KiB, each 4 KiB page different from its neighbours
    s3.put_object(Bucket=s3_bucket, Key="pages.bin", Body=data)
    got = s3.get_object(Bucket=s3_bucket, Key="pages.bin", Range="bytes=4096-8191")
    assert got["ContentRange"] == f"bytes 4096-8191/{len(data)}"
    assert got["Body"].read() == data[4096:8192]


def test_listing_pages_through_a_prefix(s3_server: S3Server, s3_bucket: str) -> None:
    s3 = boto3_client(s3_server.endpoint)
    wanted = [f"layers/{i:04d}-abcdef/manifest.json" for i in range(23)]
    for key in [*wanted, "guests/x", "layersX"]:
        s3.put_object(Bucket=s3_bucket, Key=key, Body=b"")
    seen: list[str] = []
    token: str | None = None
    pages = 0
    while True:
        extra = {"ContinuationToken": token} if token else {}
        page = s3.list_objects_v2(Bucket=s3_bucket, Prefix="layers/", MaxKeys=10, **extra)  # type: ignore[arg-type]
        pages += 1
        seen += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            break
        token = page["NextContinuationToken"]
    assert seen == wanted
    assert pages == 3
