"""Checkpoint and restore into a store in an S3 bucket against a directory store, same run.

For each guest size (``--sizes``, default 256M,2G) and each kind of store (a directory, and
``s3://`` on a SeaweedFS started here as the tests start it, tests/framework/s3server.py),
the test guest (guest/build) is booted under TCG, checkpointed ``--deltas`` + 1 times (a
base layer, then deltas), and stopped; then a *second host* (its own keys, data and runtime
directories: for the bucket, an empty working copy, so the whole chain is fetched) restores
the newest delta. Every command is the CLI, run as a user runs it. Per checkpoint it prints:

- pause: the guest's pause, as the layer records it (the upload comes after it ends); for
  the deltas their median and maximum;
- visible: the command's wall time until it returned, i.e. until the layer was committed
  (directory) or uploaded and named by the bucket's catalog (bucket); deltas: median;
- bytes: the layer's files (what a bucket store uploads); deltas: their sum;

and per restore the command's wall time until the guest runs (fetch included for the bucket).

    python -m benchmarks.s3_store [--sizes 256M,2G] [--json FILE]

The server shares this machine's cores with QEMU and vmckpt, so absolute times are an upper
bound. Benchmarks print numbers; nothing here asserts them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tests.framework.guest import GUEST_BUILD, guest_append, parse_states, wait_for
from tests.framework.s3server import S3Server, boto3_client, running_seaweedfs
from vmckpt.images import Store
from vmckpt.images.bucket import BucketUrl, is_bucket_url
from vmckpt.images.bucketstore import working_path
from vmckpt.machine.qemu import SERIAL_LOG

HOST_VARS = ("VMCKPT_KEYS_DIR", "VMCKPT_DATA_DIR", "VMCKPT_RUNTIME_DIR")
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    size: str
    store: str
    pause_base_ms: float
    visible_base_s: float
    bytes_base: int
    pause_delta_ms: float  # median
    pause_delta_max_ms: float
    visible_delta_s: float  # median
    bytes_delta: int  # all deltas
    restore_s: float


class Host:
    def __init__(self, root: Path, extra: dict[str, str]) -> None:
        # Short names: QEMU's sockets live in the runtime directory (108-byte limit).
        self.vars = {var: str(root / var[7]) for var in HOST_VARS}  # k, d, r
        self.env = {**os.environ, **self.vars, **extra}

    def run(self, *args: str) -> tuple[str, float]:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "vmckpt", *args],
            capture_output=True, text=True, env=self.env, cwd=REPO, timeout=3600,
        )  # fmt: skip
        took = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"vmckpt {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout, took

    @contextlib.contextmanager
    def here(self) -> Iterator[None]:
        saved = {var: os.environ.get(var) for var in HOST_VARS}
        os.environ.update(self.vars)
        try:
            yield
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value

    def serial(self, store: str, name: str) -> str:
        with self.here():
            path = working_path(BucketUrl.parse(store)) if is_bucket_url(store) else Path(store)
            log = Store(path).host.runtime_path(name) / SERIAL_LOG
        return log.read_text(errors="replace") if log.exists() else ""

    def wait_running(self, store: str, name: str, count: int) -> None:
        wait_for(
            lambda: len(parse_states(self.serial(store, name))) >= count,
            f"guest {name} printing {count} STATE lines",
            900,
        )


def copy_keys(source: Host, target: Host) -> None:
    src, dst = Path(source.vars["VMCKPT_KEYS_DIR"]), Path(target.vars["VMCKPT_KEYS_DIR"])
    dst.mkdir(parents=True, exist_ok=True, mode=0o700)
    for key in src.iterdir():
        if len(key.name) == 32:
            shutil.copy2(key, dst / key.name)


def measure(size: str, kind: str, scratch: Path, server: S3Server, buf_mb: int, deltas: int) -> Row:
    env = server.endpoint.environment()
    a = Host(scratch / f"{kind[0]}{size}a", env)
    b = Host(scratch / f"{kind[0]}{size}b", env)
    if kind == "bucket":
        bucket = f"bench-{size.lower()}"
        boto3_client(server.endpoint).create_bucket(Bucket=bucket)
        store = f"s3://{bucket}/store"
    else:
        store = str(scratch / f"dir-{size}")
    a.run("init", store)
    try:
        a.run(
            "run", "g", "--store", store, "--kernel", str(GUEST_BUILD / "vmlinuz"),
            "--initrd", str(GUEST_BUILD / "initrd.img"), "--memory", size, "--accel", "tcg",
            "--append", guest_append(pages=4, buf_mb=buf_mb), "--detach",
        )  # fmt: skip
        a.wait_running(store, "g", 2)
        rows: list[dict[str, Any]] = []
        times: list[float] = []
        for _ in range(1 + deltas):
            out, took = a.run("checkpoint", "g", "--store", store, "--json")
            rows.append(json.loads(out))
            times.append(took)
    finally:
        with contextlib.suppress(RuntimeError):
            a.run("stop", "g", "--store", store)
    copy_keys(a, b)
    if kind == "bucket":
        b.run("init", store)
    else:
        b = a  # the directory store is on host a
    try:
        _, restore_s = b.run(
            "restore", "--store", store, "--layer", rows[-1]["layer"], "--name", "r",
            "--detach", "--no-lazy",
        )  # fmt: skip
    finally:
        with contextlib.suppress(RuntimeError):
            b.run("stop", "r", "--store", store)
    pauses = [float(row["pause_ms"]) for row in rows[1:]]
    return Row(
        size, kind,
        float(rows[0]["pause_ms"]), times[0], int(rows[0]["bytes"]),
        statistics.median(pauses), max(pauses), statistics.median(times[1:]),
        sum(int(row["bytes"]) for row in rows[1:]), restore_s,
    )  # fmt: skip


def table(rows: Sequence[Row]) -> str:
    head = (
        f"{'size':>5} {'store':>6} | {'pause base':>10} {'visible':>8} {'bytes':>10} | "
        f"{'delta pause med/max':>19} {'visible':>8} {'bytes':>10} | {'restore':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.size:>5} {r.store:>6} | {r.pause_base_ms:>8.1f}ms {r.visible_base_s:>7.2f}s "
            f"{r.bytes_base / 2**20:>7.1f}MiB | "
            f"{r.pause_delta_ms:>8.1f}/{r.pause_delta_max_ms:<6.1f}ms "
            f"{r.visible_delta_s:>7.2f}s {r.bytes_delta / 2**20:>7.1f}MiB | {r.restore_s:>7.2f}s"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="256M,2G", help="guest memory sizes")
    parser.add_argument("--buf-mb", type=int, default=64, help="what the guest rewrites (MiB)")
    parser.add_argument("--deltas", type=int, default=5, help="delta checkpoints per guest")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    scratch = Path(tempfile.mkdtemp(prefix="vk-s3b-", dir="/tmp"))
    try:
        with running_seaweedfs() as server:
            for size in args.sizes.split(","):
                for kind in ("dir", "bucket"):
                    rows.append(measure(size, kind, scratch, server, args.buf_mb, args.deltas))
                    print(table(rows[-1:]).splitlines()[-1], flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
