"""Two "hosts" sharing a store in a bucket, for the tests of stores in buckets: each its own
keys, data and runtime directories (so its own host id), the key copied from one to the other
as a user would, and the bucket's endpoint and URL as fixtures (tests/conftest.py imports them)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.s3server import S3Server
from vmckpt.images.bucket import BucketConfig, BucketUrl

HOST_VARS = ("VMCKPT_KEYS_DIR", "VMCKPT_DATA_DIR", "VMCKPT_RUNTIME_DIR")


class Host:
    """One "host": its own keys, data and runtime directories (so its own host id)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {var: str(root / var.lower()) for var in HOST_VARS}

    def __enter__(self) -> Host:
        self.saved = {var: os.environ.get(var) for var in HOST_VARS}
        os.environ.update(self.env)
        return self

    def __exit__(self, *exc: object) -> None:
        for var, value in self.saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def share_key(store_id: str, source: Host, target: Host) -> None:
    """What the user does to let another host use the store: copy its key."""
    src = Path(source.env["VMCKPT_KEYS_DIR"]) / store_id
    dst = Path(target.env["VMCKPT_KEYS_DIR"]) / store_id
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(src, dst)
    os.chmod(dst, 0o600)


@pytest.fixture
def config(s3_server: S3Server) -> BucketConfig:
    ep = s3_server.endpoint
    return BucketConfig(ep.url, ep.region, ep.access_key, ep.secret_key)


@pytest.fixture
def url(s3_bucket: str) -> BucketUrl:
    return BucketUrl(s3_bucket, "team/stores")


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[tuple[Host, Host]]:
    yield Host(tmp_path / "a"), Host(tmp_path / "b")
