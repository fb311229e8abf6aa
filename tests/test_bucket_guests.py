"""Real guests (TCG) checkpointed into a store in an S3 bucket (SeaweedFS) and restored from
it on another "host": a host with its own keys, data and runtime directories (its own host
id and working copy), and in the first test its own network namespace as well, reaching the
one S3 server over its veth pair. Every QEMU is ended by PID (through its record); the
namespaces are deleted at the end."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.framework.guest import (
    REPO,
    State,
    guest_append,
    one_line_error,
    parse_states,
    tail,
    wait_for,
)
from tests.framework.s3server import S3Server, boto3_client, running_seaweedfs
from vmckpt.guests.local import LocalGuest, local_guest_names
from vmckpt.images import Store
from vmckpt.images.bucket import BucketUrl
from vmckpt.images.bucketstore import working_path
from vmckpt.machine.qemu import SERIAL_LOG

HOST_VARS = ("VMCKPT_KEYS_DIR", "VMCKPT_DATA_DIR", "VMCKPT_RUNTIME_DIR")
MEMORY = "128M"


@dataclass
class BucketHost:
    """One host using the bucket: its directories, its network namespace (or this one), the
    endpoint it reaches the server at, and the guests it started."""

    root: Path
    s3_env: dict[str, str]
    namespace: str | None = None
    started: set[str] = field(default_factory=set)

    @property
    def env(self) -> dict[str, str]:
        own = {var: str(self.root / var.lower()) for var in HOST_VARS}
        return {**os.environ, **own, **self.s3_env}

    def run(
        self, *args: str, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        prefix = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "vmckpt", *args],
            capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=600,
            cwd=REPO,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"vmckpt {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        prefix = ["ip", "netns", "exec", self.namespace] if self.namespace else []
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", "vmckpt", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=self.env, cwd=REPO,
        )  # fmt: skip

    @contextlib.contextmanager
    def here(self) -> Iterator[None]:
        """This process sees this host's directories (to read its working copy and logs)."""
        saved = {var: os.environ.get(var) for var in HOST_VARS}
        os.environ.update({var: self.env[var] for var in HOST_VARS})
        try:
            yield
        finally:
            for var, value in saved.items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value

    def working_store(self, url: BucketUrl) -> Store:
        with self.here():
            return Store(working_path(url))

    def states(self, url: BucketUrl, name: str) -> list[State]:
        with self.here():
            log = Store(working_path(url)).host.runtime_path(name) / SERIAL_LOG
        return parse_states(log.read_text(errors="replace")) if log.exists() else []

    def wait_states(self, url: BucketUrl, name: str, count: int) -> list[State]:
        return wait_for(
            lambda: s if len(s := self.states(url, name)) >= count else None,
            f"guest {name} printing {count} STATE lines",
            180,
            evidence=lambda: tail(str(self.states(url, name))),
        )

    def run_guest(self, url: BucketUrl, name: str, media: Path) -> None:
        self.started.add(name)
        self.run(
            "run", name, "--store", str(url),
            "--kernel", str(media / "vmlinuz"), "--initrd", str(media / "initrd.img"),
            "--append", guest_append(pages=4, buf_mb=16), "--memory", MEMORY, "--accel", "tcg",
            "--detach",
        )  # fmt: skip

    def kill_guests(self, url: BucketUrl) -> None:
        """End every QEMU this host started for the store, by the PID of its record."""
        with self.here(), contextlib.suppress(Exception):
            store = Store(working_path(url))
            for name in local_guest_names(store):
                with contextlib.suppress(Exception):
                    process = LocalGuest(store, name).record.process
                    if process is not None:
                        process.kill()


def share_key(url: BucketUrl, source: BucketHost, target: BucketHost) -> None:
    store_id = source.working_store(url).store_id
    assert store_id is not None
    src = Path(source.env["VMCKPT_KEYS_DIR"]) / store_id
    dst = Path(target.env["VMCKPT_KEYS_DIR"]) / store_id
    dst.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(src, dst)
    os.chmod(dst, 0o600)


def endpoint_env(server: S3Server) -> dict[str, str]:
    return server.endpoint.environment()


def catalog_layers(server: S3Server, url: BucketUrl) -> set[str]:
    """The layers the bucket's catalog names (read with another client: boto3)."""
    body = boto3_client(server.endpoint).get_object(
        Bucket=url.bucket, Key=f"{url.prefix}/catalog.json"
    )["Body"]
    return set(json.loads(body.read())["layers"])


def layer_objects(server: S3Server, url: BucketUrl, layer: str) -> list[str]:
    client = boto3_client(server.endpoint)
    found = client.list_objects_v2(Bucket=url.bucket, Prefix=f"{url.prefix}/layers/{layer}/")
    return [obj["Key"] for obj in found.get("Contents", [])]


@pytest.fixture
def scratch() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vk-b-", dir="/tmp"))  # short: QEMU's sockets
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.qemu
def test_killed_upload_leaves_nothing_visible_and_push_retries(
    guest_images: Path, s3_server: S3Server, s3_bucket: str, scratch: Path
) -> None:
    url = BucketUrl(s3_bucket, "killed")
    a = BucketHost(scratch / "a", endpoint_env(s3_server))
    b = BucketHost(scratch / "b", endpoint_env(s3_server))
    try:
        a.run("init", str(url))
        a.run_guest(url, "g", guest_images)
        a.wait_states(url, "g", 2)
        # vmckpt dies (SIGKILL) after the layer's first object is up: the pause was over
        # (the layer was committed on this host), the catalog not yet replaced.
        died = a.run(
            "checkpoint", "g", "--store", str(url), "--json", check=False,
            env={"VMCKPT_FAULT": "kill-at:mid-upload"},
        )  # fmt: skip
        assert died.returncode == -signal.SIGKILL, died.stderr
        layer = json.loads(died.stdout)["layer"]
        seq = a.states(url, "g")[-1].seq
        a.wait_states(url, "g", seq + 3)  # the guest runs on
        assert layer_objects(s3_server, url, layer), "no object was uploaded before the kill"
        assert layer not in catalog_layers(s3_server, url)  # not visible
        share_key(url, a, b)
        one_line_error(
            b.run("restore", "--store", str(url), "--layer", layer, "--name", "x", check=False),
            "no layer matches",
        )
        listed = json.loads(a.run("list", "--store", str(url), "--json").stdout)
        assert listed["bucket"]["not_uploaded"] == [layer]  # kept on host a
        out = a.run("gc", "--store", str(url), "--upload-grace", "0").stdout
        assert f"the objects of {layer}" in out
        assert layer_objects(s3_server, url, layer) == []
        assert layer in a.run("push", "--store", str(url)).stdout
        assert layer in catalog_layers(s3_server, url)
        # watch uploads each layer as it goes.
        out = a.run("watch", "g", "--store", str(url), "--interval", "1s", "--count", "2",
                    "--json").stdout  # fmt: skip
        watched = [json.loads(line)["layer"] for line in out.splitlines() if line.strip()]
        assert len(watched) == 2 and set(watched) <= catalog_layers(s3_server, url)
        # The other host restores it from the bucket alone.
        b.started.add("g2")
        b.run("restore", "--store", str(url), "--layer", layer, "--name", "g2", "--detach")
        restored = b.wait_states(url, "g2", 2)
        assert restored[0].seq <= seq + 1
    finally:
        a.kill_guests(url)
        b.kill_guests(url)


@dataclass
class Namespace:
    name: str
    host_veth: str
    ns_veth: str
    host_address: str
    address: str


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def two_namespaces() -> Iterator[tuple[Namespace, Namespace]]:
    """Two network namespaces, each with a veth pair to this one (10.202.N.1 here, .2 there)
    and a default route through it, so each reaches an address of this host."""
    pid = os.getpid()
    made: list[Namespace] = []
    try:
        for index in range(2):
            subnet = 10 + (pid * 2 + index) % 240
            ns = Namespace(
                f"vmckpt-b{index}-{pid}", f"vbh{index}{pid}"[:15], f"vbn{index}{pid}"[:15],
                f"10.202.{subnet}.1", f"10.202.{subnet}.2",
            )  # fmt: skip
            _ip("netns", "add", ns.name)
            made.append(ns)
            _ip("link", "add", ns.host_veth, "type", "veth", "peer", "name", ns.ns_veth)
            _ip("link", "set", ns.ns_veth, "netns", ns.name)
            _ip("addr", "add", f"{ns.host_address}/24", "dev", ns.host_veth)
            _ip("link", "set", ns.host_veth, "up")
            _ip("-n", ns.name, "addr", "add", f"{ns.address}/24", "dev", ns.ns_veth)
            _ip("-n", ns.name, "link", "set", ns.ns_veth, "up")
            _ip("-n", ns.name, "link", "set", "lo", "up")
            _ip("-n", ns.name, "route", "add", "default", "via", ns.host_address)
        yield made[0], made[1]
    finally:
        for ns in made:
            subprocess.run(["ip", "link", "del", ns.host_veth], capture_output=True, check=False)
            subprocess.run(["ip", "netns", "del", ns.name], capture_output=True, check=False)


@pytest.mark.qemu
@pytest.mark.root
def test_two_hosts_checkpoint_into_one_bucket_at_once_and_restore_each_others(
    guest_images: Path, root: None, scratch: Path
) -> None:
    with two_namespaces() as (ns_a, ns_b), running_seaweedfs(bind=ns_a.host_address) as server:
        client = boto3_client(server.endpoint)
        client.create_bucket(Bucket="shared")
        url = BucketUrl("shared", "hosts")
        env = endpoint_env(server)
        a = BucketHost(scratch / "a", env, namespace=ns_a.name)
        b = BucketHost(scratch / "b", env, namespace=ns_b.name)
        try:
            a.run("init", str(url))
            share_key(url, a, b)
            b.run("init", str(url))  # joins: the store exists, host b has its key
            assert a.working_store(url).store_id == b.working_store(url).store_id
            a.run_guest(url, "ga", guest_images)
            b.run_guest(url, "gb", guest_images)
            a.wait_states(url, "ga", 2)
            b.wait_states(url, "gb", 2)
            layers: dict[str, list[str]] = {"ga": [], "gb": []}
            for _round in range(2):  # both hosts at once, twice (the second: deltas)
                running = {
                    "ga": a.popen("checkpoint", "ga", "--store", str(url), "--json"),
                    "gb": b.popen("checkpoint", "gb", "--store", str(url), "--json"),
                }
                for name, process in running.items():
                    out, err = process.communicate(timeout=600)
                    assert process.returncode == 0, err
                    layers[name].append(json.loads(out)["layer"])
            visible = catalog_layers(server, url)
            assert {*layers["ga"], *layers["gb"]} <= visible
            # Each host restores the other's newest layer (its chain fetched from the bucket).
            a.started.add("from-b")
            a.run("restore", "--store", str(url), "--layer", layers["gb"][-1], "--name",
                  "from-b", "--detach", "--no-lazy")  # fmt: skip
            b.started.add("from-a")
            b.run("restore", "--store", str(url), "--layer", layers["ga"][-1], "--name",
                  "from-a", "--detach", "--no-lazy")  # fmt: skip
            assert a.wait_states(url, "from-b", 2)
            assert b.wait_states(url, "from-a", 2)
            fetched_by_a = set(a.working_store(url).layer_names())
            assert set(layers["gb"]) <= fetched_by_a
            # A chain across hosts: host b's delta on host a's layer, restored on host a.
            row = json.loads(b.run("checkpoint", "from-a", "--store", str(url), "--json").stdout)
            assert row["parent"] == layers["ga"][-1]
            a.started.add("back")
            a.run("restore", "--store", str(url), "--layer", row["layer"], "--name", "back",
                  "--detach", "--no-lazy")  # fmt: skip
            assert a.wait_states(url, "back", 2)
            # verify on the bucket, from either host: every layer the catalog names.
            verified = a.run("verify", "--store", str(url)).stdout
            assert "5 layer(s) verified" in verified, verified
            heads = json.loads(
                client.get_object(Bucket="shared", Key="hosts/catalog.json")["Body"].read()
            )["heads"]
            assert {"guest/ga", "guest/gb", "guest/from-a", "guest/from-b", "guest/back"} <= set(
                heads
            )
            assert heads["guest/from-a"]["layer"] == row["layer"]
        finally:
            a.kill_guests(url)
            b.kill_guests(url)
