"""Probe S3 servers for what an S3 store needs, and compare boto3 with obstore on one.

    python -m benchmarks.s3_probe probe [--json FILE]
        starts SeaweedFS as the tests do (tests/framework/s3server.py) and probes it
    python -m benchmarks.s3_probe probe --name rclone --serve \\
        'rclone serve s3 --addr {host}:{port} --auth-key {access_key},{secret_key} {data}'
        starts any server from a command template ({host} {port} {data} {access_key}
        {secret_key}; {data} is an empty directory), probes it, stops it by its PID
    python -m benchmarks.s3_probe probe --endpoint URL --access-key K --secret-key S
        probes a server that is already running
    python -m benchmarks.s3_probe bench [--quick] [--json FILE]
        boto3 against obstore on SeaweedFS: import cost, PUT 1 MiB / 64 MiB, 4 KiB ranged
        GETs (latency, and throughput with concurrency), conditional puts in each API

The probe's checks: conditional PUT (`If-None-Match: *` create-only, `If-Match: <etag>`
replace-only, each also raced by several writers at once), ranged GET (with boto3's default
response checksum validation), multipart upload (and `If-None-Match` on its completion),
ListObjectsV2 with a prefix, pages and a delimiter, and DELETE with `If-Match`. For a server
it started: seconds to the first HTTP answer, resident memory of its processes after the
probe, bytes in its data directory, and seconds to exit after SIGTERM.

Every loop here is bounded in count and time; all traffic goes to the server's address on
this machine (127.0.0.1 unless --host says otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import random
import secrets
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from tests.framework.s3server import (
    S3Endpoint,
    boto3_client,
    free_ports,
    race_puts,
    running_seaweedfs,
    stop_pid,
    stop_server,
    url_for,
    wait_http,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import CompletedPartTypeDef

MiB = 1024 * 1024
PAGE = 4096


# --- the probe ------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool | None  # None: could not be decided (an earlier step failed)
    detail: str = ""


@dataclass
class ServerReport:
    name: str
    version: str = ""
    checks: list[Check] = field(default_factory=list)
    startup_seconds: float | None = None
    rss_mib: float | None = None
    data_bytes: int | None = None
    stop_seconds: float | None = None


def _code(error: ClientError) -> str:
    meta = error.response.get("ResponseMetadata", {})
    return f"{error.response.get('Error', {}).get('Code')} {meta.get('HTTPStatusCode')}"


def _attempt(call: Callable[[], object]) -> str:
    """'ok' or the error's code and HTTP status."""
    try:
        call()
    except ClientError as error:
        return _code(error)
    except Exception as error:  # a transport or checksum error: report it, go on
        return f"{type(error).__name__}: {str(error)[:120]}"
    return "ok"


def _race(
    endpoint: S3Endpoint,
    bucket: str,
    kind: str,
    writers: int,
    rounds: int,
    deadline: float,
) -> Check:
    """`writers` conditional PUTs of one key at once, `rounds` times: exactly one may win."""
    clients = [boto3_client(endpoint) for _ in range(writers)]
    bad: list[str] = []
    slowest = 0.0
    done = 0
    for round_no in range(rounds):
        if time.monotonic() > deadline:
            break
        key = f"race/{kind}/{round_no}"
        condition: dict[str, str] = {"IfNoneMatch": "*"}
        if kind == "if-match":
            try:
                etag = clients[0].put_object(Bucket=bucket, Key=key, Body=b"base").get("ETag", "")
            except ClientError as error:
                return Check(f"race {kind}", None, _code(error))
            condition = {"IfMatch": etag}
        answers = race_puts(clients, bucket, key, condition)
        outcomes = [result for result, _seconds in answers]
        took = [seconds for _result, seconds in answers]
        slowest = max(slowest, *took)
        done += 1
        if outcomes.count("ok") != 1:
            bad.append(f"round {round_no}: {outcomes}")
    detail = f"{writers} writers x {done} rounds, slowest answer {slowest:.2f} s"
    if bad:
        return Check(f"race {kind}", False, detail + "; " + "; ".join(bad[:2]))
    return Check(f"race {kind}", True, detail + ": one winner each round")


def probe(endpoint: S3Endpoint, bucket: str, create_bucket: bool, budget: float) -> list[Check]:
    s3 = boto3_client(endpoint)
    checks: list[Check] = []
    deadline = time.monotonic() + budget
    if create_bucket:
        outcome = _attempt(lambda: s3.create_bucket(Bucket=bucket))
        checks.append(Check("create bucket", outcome == "ok", outcome))

    # Plain PUT, HEAD, GET: the ETag HEAD reports is the one PUT returned.
    try:
        put_etag = s3.put_object(Bucket=bucket, Key="plain", Body=b"hello").get("ETag", "")
        head_etag = s3.head_object(Bucket=bucket, Key="plain").get("ETag")
        body = s3.get_object(Bucket=bucket, Key="plain")["Body"].read()
        checks.append(
            Check(
                "put/head/get",
                body == b"hello" and head_etag == put_etag,
                f"PUT ETag {put_etag}, HEAD ETag {head_etag}",
            )
        )
    except ClientError as error:
        checks.append(Check("put/head/get", False, _code(error)))
        return checks

    # If-None-Match: * (create-only).
    first = _attempt(lambda: s3.put_object(Bucket=bucket, Key="once", Body=b"1", IfNoneMatch="*"))
    second = _attempt(lambda: s3.put_object(Bucket=bucket, Key="once", Body=b"2", IfNoneMatch="*"))
    kept = s3.get_object(Bucket=bucket, Key="once")["Body"].read()
    checks.append(
        Check(
            "If-None-Match: * on PUT",
            first == "ok" and second.startswith("PreconditionFailed 412") and kept == b"1",
            f"first {first}, second {second}, object holds {kept!r}",
        )
    )

    # If-Match: <etag> (replace only the version read).
    etag = s3.head_object(Bucket=bucket, Key="once").get("ETag", "")
    fresh = _attempt(lambda: s3.put_object(Bucket=bucket, Key="once", Body=b"3", IfMatch=etag))
    stale = _attempt(lambda: s3.put_object(Bucket=bucket, Key="once", Body=b"4", IfMatch=etag))
    absent = _attempt(lambda: s3.put_object(Bucket=bucket, Key="absent", Body=b"5", IfMatch=etag))
    kept = s3.get_object(Bucket=bucket, Key="once")["Body"].read()
    created = s3.list_objects_v2(Bucket=bucket, Prefix="absent").get("KeyCount", 0)
    checks.append(
        Check(
            "If-Match: <etag> on PUT",
            fresh == "ok" and stale.startswith("PreconditionFailed 412") and kept == b"3"
            and absent != "ok" and created == 0,
            f"current {fresh}, stale {stale}, missing key {absent}, object holds {kept!r}",
        )
    )  # fmt: skip

    for kind in ("if-none-match", "if-match"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            checks.append(Check(f"race {kind}", None, "no time left"))
            continue
        checks.append(_race(endpoint, bucket, kind, writers=8, rounds=5, deadline=deadline))

    # Ranged GET of one 4 KiB page: with boto3's default checksum validation, and without.
    data = random.Random(1).randbytes(64 * PAGE)
    s3.put_object(Bucket=bucket, Key="pages", Body=data)
    lean = boto3_client(endpoint, checksums="when_required")
    for label, client in (("ranged GET", s3), ("ranged GET, no checksums", lean)):
        try:
            got = client.get_object(
                Bucket=bucket, Key="pages", Range=f"bytes={5 * PAGE}-{6 * PAGE - 1}"
            )
            body = got["Body"].read()
            status = got["ResponseMetadata"]["HTTPStatusCode"]
            checks.append(
                Check(
                    label,
                    status == 206 and body == data[5 * PAGE : 6 * PAGE],
                    f"HTTP {status}, Content-Range {got.get('ContentRange')}, {len(body)} bytes"
                    + ("" if body == data[5 * PAGE : 6 * PAGE] else ", WRONG BYTES"),
                )
            )
        except Exception as error:
            checks.append(Check(label, False, f"{type(error).__name__}: {str(error)[:160]}"))

    checks += _multipart(s3, bucket)
    checks.append(_listing(s3, bucket))

    # DELETE with If-Match (S3 has it since 2025): informational.
    etag = s3.head_object(Bucket=bucket, Key="plain").get("ETag", "")
    wrong = '"' + "0" * 32 + '"'
    refused = _attempt(lambda: s3.delete_object(Bucket=bucket, Key="plain", IfMatch=wrong))
    still = _attempt(lambda: s3.head_object(Bucket=bucket, Key="plain"))
    allowed = _attempt(lambda: s3.delete_object(Bucket=bucket, Key="plain", IfMatch=etag))
    checks.append(
        Check(
            "If-Match on DELETE",
            refused.startswith("PreconditionFailed") and still == "ok" and allowed == "ok",
            f"stale ETag {refused} (object then {still}), current ETag {allowed}",
        )
    )
    return checks


def _multipart(s3: S3Client, bucket: str) -> list[Check]:
    parts_data = [b"a" * (5 * MiB), b"b" * (5 * MiB), b"c" * MiB]
    try:
        upload = s3.create_multipart_upload(Bucket=bucket, Key="multi")["UploadId"]
        parts: list[CompletedPartTypeDef] = []
        for number, chunk in enumerate(parts_data, start=1):
            etag = s3.upload_part(
                Bucket=bucket, Key="multi", UploadId=upload, PartNumber=number, Body=chunk
            )["ETag"]
            parts.append({"ETag": etag, "PartNumber": number})
        done = s3.complete_multipart_upload(
            Bucket=bucket, Key="multi", UploadId=upload, MultipartUpload={"Parts": parts}
        )
        body = s3.get_object(Bucket=bucket, Key="multi")["Body"].read()
        uploaded = Check(
            "multipart upload", body == b"".join(parts_data), f"3 parts, ETag {done.get('ETag')}"
        )
    except ClientError as error:
        return [Check("multipart upload", False, _code(error))]
    # Its completion with If-None-Match: * onto the existing key must be refused.
    try:
        again = s3.create_multipart_upload(Bucket=bucket, Key="multi")["UploadId"]
        etag = s3.upload_part(
            Bucket=bucket, Key="multi", UploadId=again, PartNumber=1, Body=b"z" * MiB
        )["ETag"]
    except ClientError as error:
        return [uploaded, Check("If-None-Match on completion", None, _code(error))]
    refused = _attempt(
        lambda: s3.complete_multipart_upload(
            Bucket=bucket,
            Key="multi",
            UploadId=again,
            MultipartUpload={"Parts": [{"ETag": etag, "PartNumber": 1}]},
            IfNoneMatch="*",
        )
    )
    _attempt(lambda: s3.abort_multipart_upload(Bucket=bucket, Key="multi", UploadId=again))
    size = s3.head_object(Bucket=bucket, Key="multi")["ContentLength"]
    return [
        uploaded,
        Check(
            "If-None-Match on completion",
            refused.startswith("PreconditionFailed") and size == 11 * MiB,
            f"onto an existing key: {refused}, object then {size / MiB:.0f} MiB",
        ),
    ]


def _listing(s3: S3Client, bucket: str) -> Check:
    wanted = [f"list/layers/{i:04d}-abcdef/manifest.json" for i in range(25)]
    for key in [*wanted, "list/guests/a", "list/layersX"]:
        s3.put_object(Bucket=bucket, Key=key, Body=b"")
    seen: list[str] = []
    pages = 0
    token = ""
    try:
        while pages < 20:
            extra = {"ContinuationToken": token} if token else {}
            page = s3.list_objects_v2(
                Bucket=bucket,
                Prefix="list/layers/",
                MaxKeys=10,
                **extra,  # type: ignore[arg-type]
            )
            pages += 1
            seen += [item["Key"] for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        tops = s3.list_objects_v2(Bucket=bucket, Prefix="list/", Delimiter="/")
        prefixes = sorted(p["Prefix"] for p in tops.get("CommonPrefixes", []))
    except ClientError as error:
        return Check("ListObjectsV2", False, _code(error))
    ok = seen == wanted and pages == 3 and prefixes == ["list/guests/", "list/layers/"]
    return Check(
        "ListObjectsV2",
        ok,
        f"{len(seen)} keys in {pages} pages of 10, delimiter '/' gives {prefixes}",
    )


def _tree_rss_mib(pid: int) -> float:
    """Resident memory of `pid` and all its descendants, in MiB."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    total_kib = 0
    todo = [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kib += int(line.split()[1])
    return total_kib / 1024


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


@contextlib.contextmanager
def served_by_command(
    template: str, host: str, workdir: Path, access_key: str = "", secret_key: str = ""
) -> Iterator[tuple[S3Endpoint, int, float]]:
    """Start a server from `template`, wait for its first HTTP answer; stop it by PID.

    The credentials are made up unless given (for a server with fixed ones)."""
    (port,) = free_ports(host, 1)
    access_key = access_key or "vmckptprobe"
    secret_key = secret_key or secrets.token_hex(16)
    data = workdir / "data"
    data.mkdir()
    argv = shlex.split(
        template.format(
            host=host, port=port, data=data, access_key=access_key, secret_key=secret_key
        )
    )
    log = workdir / "server.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            argv,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        waited, _status = wait_http(host, port, process.pid, log)
        yield S3Endpoint(url_for(host, port), access_key, secret_key), process.pid, waited
    finally:
        # The caller may have stopped it by PID already (and so reaped it): poll() then
        # says so, and Popen does not warn about a child it never saw end.
        if process.poll() is None:
            stop_pid(process.pid)
            process.poll()


def run_probe(args: argparse.Namespace) -> ServerReport:
    bucket = args.bucket or f"vmckpt-probe-{secrets.token_hex(4)}"
    report = ServerReport(args.name or ("external" if args.endpoint else "seaweedfs"))
    report.version = args.version or ""
    if args.endpoint:
        endpoint = S3Endpoint(args.endpoint, args.access_key, args.secret_key)
        report.checks = probe(endpoint, bucket, not args.no_create_bucket, args.budget)
        return report
    if args.serve:
        workdir = Path(tempfile.mkdtemp(prefix="vk-s3probe-", dir="/tmp"))
        try:
            with served_by_command(
                args.serve, args.host, workdir, args.access_key, args.secret_key
            ) as (endpoint, pid, waited):
                report.startup_seconds = waited
                report.checks = probe(endpoint, bucket, not args.no_create_bucket, args.budget)
                report.rss_mib = _tree_rss_mib(pid)
                report.data_bytes = _du(workdir / "data")
                report.stop_seconds = stop_pid(pid)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return report
    with running_seaweedfs(bind=args.host) as server:
        report.version = report.version or _weed_version()
        report.startup_seconds = server.startup_seconds
        report.checks = probe(server.endpoint, bucket, True, args.budget)
        report.rss_mib = _tree_rss_mib(server.pid)
        report.data_bytes = _du(server.workdir / "data")
        report.stop_seconds = stop_server(server)
    return report


def _weed_version() -> str:
    from tests.framework.s3server import weed_binary

    out = subprocess.run(
        [str(weed_binary()), "version"], capture_output=True, text=True, check=False
    ).stdout
    return out.split("\n", 1)[0].strip()


def format_report(report: ServerReport) -> str:
    lines = [f"== {report.name} {report.version}".rstrip()]
    for check in report.checks:
        mark = {True: "yes", False: "NO ", None: "?  "}[check.ok]
        lines.append(f"  {mark} {check.name:26} {check.detail}")
    facts = []
    if report.startup_seconds is not None:
        facts.append(f"first HTTP answer {report.startup_seconds:.2f} s after exec")
    if report.rss_mib is not None:
        facts.append(f"RSS {report.rss_mib:.0f} MiB after the probe")
    if report.data_bytes is not None:
        facts.append(f"data directory {report.data_bytes / MiB:.1f} MiB")
    if report.stop_seconds is not None:
        facts.append(f"exit {report.stop_seconds:.2f} s after SIGTERM")
    if facts:
        lines.append("  " + "; ".join(facts))
    return "\n".join(lines)


# --- boto3 against obstore --------------------------------------------------------------------


@dataclass
class Measurement:
    client: str
    what: str
    count: int
    median_ms: float | None = None
    p99_ms: float | None = None
    per_second: float | None = None  # requests a second
    mib_per_second: float | None = None
    cpu_ms: float | None = None  # this process's CPU time (all its threads) per request
    note: str = ""


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _timed(
    client: str, what: str, size: int, calls: Sequence[Callable[[], object]], budget: float
) -> Measurement:
    """One call after another (each timed), within `budget` seconds."""
    latencies: list[float] = []
    cpu = time.process_time()
    started = time.perf_counter()
    for call in calls:
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
        if time.perf_counter() - started > budget:
            break
    elapsed = time.perf_counter() - started
    return Measurement(
        client,
        what,
        len(latencies),
        median_ms=statistics.median(latencies) * 1000,
        p99_ms=_percentile(latencies, 0.99) * 1000,
        per_second=len(latencies) / elapsed,
        mib_per_second=len(latencies) * size / MiB / elapsed,
        cpu_ms=(time.process_time() - cpu) * 1000 / len(latencies),
    )


def _threaded(
    client: str, what: str, size: int, call: Callable[[int], object], args: list[int], threads: int
) -> Measurement:
    """`call(arg)` for each of `args` from `threads` threads at once: requests a second."""
    count = len(args)
    cpu = time.process_time()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(call, args))
    elapsed = time.perf_counter() - started
    return Measurement(
        client,
        what,
        count,
        per_second=count / elapsed,
        mib_per_second=count * size / MiB / elapsed,
        cpu_ms=(time.process_time() - cpu) * 1000 / count,
    )


def _import_cost(code: str, repeat: int) -> tuple[float, float]:
    """Median seconds for (import, first client) in a fresh interpreter."""
    script = (
        "import time; t0 = time.perf_counter()\n"
        + code
        + "\nprint(t1 - t0, time.perf_counter() - t1)"
    )
    imports, clients = [], []
    for _ in range(repeat):
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.split()
        imports.append(float(out[0]))
        clients.append(float(out[1]))
    return statistics.median(imports), statistics.median(clients)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    import obstore
    from obstore.exceptions import AlreadyExistsError, PreconditionError
    from obstore.store import S3Store

    quick = args.quick
    small_puts, big_puts = (10, 2) if quick else (40, 5)
    range_gets = 300 if quick else 2000
    concurrent_gets = 1000 if quick else 5000
    budget = 60.0  # seconds, per measurement
    results: list[Measurement] = []
    notes: dict[str, str] = {}

    with running_seaweedfs(bind=args.host) as server:
        ep = server.endpoint
        bucket = "vmckpt-bench"
        boto = boto3_client(ep, pool=64)
        boto.create_bucket(Bucket=bucket)
        store = S3Store(
            bucket,
            config={
                "endpoint": ep.url,
                "access_key_id": ep.access_key,
                "secret_access_key": ep.secret_key,
                "region": ep.region,
                "virtual_hosted_style_request": False,
            },
            client_options={"allow_http": True, "pool_max_idle_per_host": "64"},
        )
        boto_lean = boto3_client(ep, pool=64, checksums="when_required")

        # Import cost, and building the first client (a fresh interpreter each time).
        boto_import, boto_client = _import_cost(
            "import boto3\nt1 = time.perf_counter()\n"
            f"boto3.client('s3', endpoint_url={ep.url!r}, region_name='us-east-1', "
            "aws_access_key_id='a', aws_secret_access_key='b')",
            5,
        )
        ob_import, ob_client = _import_cost(
            "import obstore\nfrom obstore.store import S3Store\nt1 = time.perf_counter()\n"
            f"S3Store('b', endpoint={ep.url!r}, region='us-east-1', access_key_id='a', "
            "secret_access_key='b', client_options={'allow_http': True})",
            5,
        )
        notes["import boto3"] = (
            f"{boto_import * 1000:.0f} ms, first client {boto_client * 1000:.0f} ms"
        )
        notes["import obstore"] = (
            f"{ob_import * 1000:.0f} ms, first store {ob_client * 1000:.0f} ms"
        )

        # PUTs.
        one = random.Random(2).randbytes(MiB)
        big = random.Random(3).randbytes(64 * MiB)
        for size, payload, count in ((MiB, one, small_puts), (64 * MiB, big, big_puts)):
            results += _put_round(boto, boto_lean, store, bucket, size, payload, count, budget)

        # 4 KiB ranged GETs from one 64 MiB object, at random page offsets.
        obstore.put(store, "pages.bin", big, use_multipart=False)
        pages = len(big) // PAGE
        rng = random.Random(4)
        offsets = [rng.randrange(pages) * PAGE for _ in range(max(range_gets, concurrent_gets))]
        want = {o: big[o : o + PAGE] for o in offsets[:50]}

        def boto_get(offset: int, client: S3Client = boto) -> bytes:
            return client.get_object(
                Bucket=bucket, Key="pages.bin", Range=f"bytes={offset}-{offset + PAGE - 1}"
            )["Body"].read()

        def boto_lean_get(offset: int) -> bytes:
            return boto_get(offset, boto_lean)

        def ob_get(offset: int) -> bytes:
            return bytes(obstore.get_range(store, "pages.bin", start=offset, length=PAGE))

        for offset, expected in want.items():
            assert boto_get(offset) == expected and ob_get(offset) == expected
        for name, get in (("boto3 get_object Range", boto_get),
                          ("boto3 get_object Range, no CRC", boto_lean_get),
                          ("obstore get_range", ob_get)):  # fmt: skip
            calls = [partial(get, o) for o in offsets[:range_gets]]
            results.append(_timed(name, "GET 4 KiB, 1 at a time", PAGE, calls, budget))
        for threads in (8, 32):
            what = f"GET 4 KiB, {threads} threads"
            for name, get in (("boto3 get_object Range", boto_get),
                              ("obstore get_range", ob_get)):  # fmt: skip
                results.append(_threaded(name, what, PAGE, get, offsets[:concurrent_gets], threads))
        for inflight in (8, 32):
            results.append(_obstore_async(store, offsets[:concurrent_gets], inflight))
        cpu = time.process_time()
        started = time.perf_counter()
        got = obstore.get_ranges(
            store, "pages.bin", starts=offsets[:concurrent_gets],
            lengths=[PAGE] * concurrent_gets, coalesce=0,
        )  # fmt: skip
        elapsed = time.perf_counter() - started
        assert all(bytes(got[i]) == want[o] for i, o in enumerate(offsets[:50]))
        results.append(Measurement(
            "obstore get_ranges (coalesce=0)", f"GET 4 KiB, {concurrent_gets} in one call",
            concurrent_gets, per_second=concurrent_gets / elapsed,
            mib_per_second=concurrent_gets * PAGE / MiB / elapsed,
            cpu_ms=(time.process_time() - cpu) * 1000 / concurrent_gets))  # fmt: skip

        # Conditional puts through each API.
        created = obstore.put(store, "cond/head", b"1", mode="create")
        try:
            obstore.put(store, "cond/head", b"2", mode="create")
            notes["obstore mode='create' twice"] = "second put SUCCEEDED (no condition sent?)"
        except AlreadyExistsError:
            notes["obstore mode='create' twice"] = "second raises AlreadyExistsError"
        replaced = obstore.put(store, "cond/head", b"3", mode={"e_tag": created["e_tag"]})
        try:
            obstore.put(store, "cond/head", b"4", mode={"e_tag": created["e_tag"]})
            notes["obstore mode=UpdateVersion(stale e_tag)"] = "SUCCEEDED (no condition sent?)"
        except PreconditionError:
            notes["obstore mode=UpdateVersion(stale e_tag)"] = "raises PreconditionError"
        notes["obstore ETags"] = f"create {created['e_tag']}, update {replaced['e_tag']}"
        again = _attempt(
            lambda: boto.put_object(Bucket=bucket, Key="cond/head", Body=b"5", IfNoneMatch="*")
        )
        notes["boto3 put_object(IfNoneMatch='*') onto it"] = f"ClientError {again}"
        server_rss = _tree_rss_mib(server.pid)
        notes["server RSS after the benchmark"] = f"{server_rss:.0f} MiB"
    return {"measurements": [asdict(m) for m in results], "notes": notes}


def _put_round(
    boto: S3Client,
    boto_lean: S3Client,
    store: Any,
    bucket: str,
    size: int,
    payload: bytes,
    count: int,
    budget: float,
) -> list[Measurement]:
    """PUTs of `payload` through each client and mode, `count` each (new keys)."""
    import obstore

    label = f"PUT {size // MiB} MiB"
    keys = range(count)
    rows = [
        _timed("boto3 put_object", label, size, [
            partial(boto.put_object, Bucket=bucket, Key=f"b/{size}/{i}", Body=payload)
            for i in keys], budget),
        _timed("boto3 put_object, no CRC", label, size, [
            partial(boto_lean.put_object, Bucket=bucket, Key=f"bl/{size}/{i}", Body=payload)
            for i in keys], budget),
        _timed("obstore put, one request", label, size, [
            partial(obstore.put, store, f"o/{size}/{i}", payload, use_multipart=False)
            for i in keys], budget),
    ]  # fmt: skip
    if size > 5 * MiB:
        rows += [
            _timed("boto3 upload_fileobj (multipart)", label, size, [
                partial(_upload_fileobj, boto, payload, bucket, f"bm/{size}/{i}")
                for i in keys], budget),
            _timed("obstore put (multipart)", label, size, [
                partial(obstore.put, store, f"om/{size}/{i}", payload) for i in keys], budget),
        ]  # fmt: skip
    return rows


def _upload_fileobj(boto: S3Client, payload: bytes, bucket: str, key: str) -> None:
    boto.upload_fileobj(io.BytesIO(payload), bucket, key)


def _obstore_async(store: Any, offsets: list[int], inflight: int) -> Measurement:
    import obstore

    async def main() -> None:
        gate = asyncio.Semaphore(inflight)

        async def one(offset: int) -> None:
            async with gate:
                await obstore.get_range_async(store, "pages.bin", start=offset, length=PAGE)

        await asyncio.gather(*(one(o) for o in offsets))

    cpu = time.process_time()
    started = time.perf_counter()
    asyncio.run(main())
    elapsed = time.perf_counter() - started
    return Measurement(
        "obstore get_range_async",
        f"GET 4 KiB, {inflight} in flight (asyncio)",
        len(offsets),
        per_second=len(offsets) / elapsed,
        mib_per_second=len(offsets) * PAGE / MiB / elapsed,
        cpu_ms=(time.process_time() - cpu) * 1000 / len(offsets),
    )


def format_bench(result: dict[str, Any]) -> str:
    lines = [
        f"{'what':34} {'client':34} {'n':>5} {'median':>9} {'p99':>9} {'req/s':>8} "
        f"{'MiB/s':>8} {'CPU/req':>9}"
    ]
    for m in result["measurements"]:

        def ms(value: float | None) -> str:
            return f"{value:7.2f}ms" if value is not None else ""

        lines.append(
            f"{m['what']:34} {m['client']:34} {m['count']:5d} {ms(m['median_ms']):>9} "
            f"{ms(m['p99_ms']):>9} {m['per_second'] or 0:8.0f} {m['mib_per_second'] or 0:8.1f} "
            f"{ms(m['cpu_ms']):>9}"
        )
    lines += [f"{key}: {value}" for key, value in result["notes"].items()]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe")
    p.add_argument("--name")
    p.add_argument("--version", help="the server's version, for the report")
    p.add_argument("--serve", help="command template that starts the server")
    p.add_argument("--endpoint")
    p.add_argument("--access-key", default="")
    p.add_argument("--secret-key", default="")
    p.add_argument("--bucket")
    p.add_argument("--no-create-bucket", action="store_true")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--budget", type=float, default=120.0, help="seconds for the race checks")
    p.add_argument("--json", metavar="FILE")
    b = sub.add_parser("bench")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--host", default="127.0.0.1")
    b.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.command == "probe":
        report = run_probe(args)
        print(format_report(report))
        if args.json:
            Path(args.json).write_text(json.dumps(asdict(report), indent=1) + "\n")
        return 0 if all(check.ok for check in report.checks) else 1
    result = run_bench(args)
    print(format_bench(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
