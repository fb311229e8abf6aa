"""Fixtures: the test guest, a fresh store per test, and the CLI runner that owns its QEMUs.

The helpers the tests share live in tests/framework/. Markers (pyproject.toml):
``qemu`` (boots real guests), ``root`` (network namespaces, mounts, libvirtd),
``libvirt``; ``pytest -m "not qemu"`` is the fast suite.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.buckets import config, hosts, url  # noqa: F401  (fixtures)
from tests.framework.guest import GUEST_BUILD, REPO, Vmckpt
from tests.framework.mechanisms import SYSTEM_QEMU, Mechanism
from tests.framework.s3server import s3_bucket, s3_server  # noqa: F401  (fixtures)

HOST_DIRS = {
    "VMCKPT_KEYS_DIR": "keys",
    "VMCKPT_RUNTIME_DIR": "run",
    "VMCKPT_DATA_DIR": "data",
}


@pytest.fixture(scope="session", autouse=True)
def host_dirs() -> Iterator[Path]:
    """Store keys, and the stores' runtime and data directories of this host, go to a
    directory of the test session (removed after it), not to the user's ~/.config/vmckpt,
    /run/vmckpt and /var/lib/vmckpt; every vmckpt the tests start inherits the settings. A
    short path: QEMU's sockets live in the runtime directories (108-byte limit)."""
    directory = Path(tempfile.mkdtemp(prefix="vk-host-", dir="/tmp"))
    old = {name: os.environ.get(name) for name in HOST_DIRS}
    for name, sub in HOST_DIRS.items():
        os.environ[name] = str(directory / sub)
    try:
        yield directory
    finally:
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def system_qemu() -> Iterator[None]:
    """vmckpt takes the newest QEMU installed (QEMU 11 where `make test` installed it); the
    tests were written for the system's QEMU 10 unless they name another (the COLO tests
    and the QEMU 11 mechanism variants set VMCKPT_QEMU themselves), so the suite names the
    system's, explicitly, for every vmckpt it runs. A VMCKPT_QEMU set outside is kept."""
    if os.environ.get("VMCKPT_QEMU"):
        yield
        return
    system = shutil.which(SYSTEM_QEMU)
    if system is not None:
        os.environ["VMCKPT_QEMU"] = system
    try:
        yield
    finally:
        os.environ.pop("VMCKPT_QEMU", None)


@pytest.fixture(scope="session")
def store_keys(host_dirs: Path) -> Path:
    return host_dirs / HOST_DIRS["VMCKPT_KEYS_DIR"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Markers follow the fixtures a test uses, so they are applied consistently."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & {"guest_images", "vmckpt", "microkernel_runner"}:
            item.add_marker(pytest.mark.qemu)
        if "root" in names:
            item.add_marker(pytest.mark.root)


@pytest.fixture(scope="session")
def guest_images() -> Path:
    """The test guest, built by `make -C guest` (a no-op when up to date)."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guest")], check=True)
    for name in ("vmlinuz", "initrd.img"):
        assert (GUEST_BUILD / name).is_file(), f"guest/build/{name} was not built"
    return GUEST_BUILD


@pytest.fixture(scope="session")
def root() -> None:
    """Tests that need root (network namespaces, mounts, libvirtd) fail loudly without it."""
    if os.geteuid() != 0:
        pytest.fail("this test needs root (run make test as root, as CI does)", pytrace=False)


def short_tmp(prefix: str) -> Path:
    # A short path: QEMU's QMP socket lives inside the store (108-byte limit).
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


@pytest.fixture
def store_dir() -> Iterator[Path]:
    path = short_tmp("vk-")
    try:
        yield path / "store"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmckpt(store_dir: Path, guest_images: Path) -> Iterator[Vmckpt]:
    runner = Vmckpt(store_dir, media=guest_images)
    try:
        yield runner
    finally:
        runner.kill_all()


@pytest.fixture
def microkernel_runner(store_dir: Path, request: pytest.FixtureRequest) -> Iterator[Vmckpt]:
    """A CLI runner for the microkernel systems (it needs no Linux guest build). A test
    parametrized with ``mechanism`` (tests/framework/mechanisms.py) runs every command on
    that mechanism's QEMU; others on the system's. Ends every QEMU it started, by PID."""
    mechanism = (
        request.getfixturevalue("mechanism")
        if "mechanism" in request.fixturenames
        else Mechanism("precopy-diff")
    )
    runner = Vmckpt(store_dir, env=mechanism.env())
    try:
        yield runner
    finally:
        runner.kill_all()
