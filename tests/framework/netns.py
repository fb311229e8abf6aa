"""'Another machine' for the tests: a network namespace with a veth pair and its own sshd.

The namespace, the veth pair and the sshd are named after the test process's
PID; the host end is 10.200.N.1, the namespace end 10.200.N.2 (a /24 used by
nothing else). Teardown ends the sshd by its PID and deletes the namespace
(which deletes the veth pair with it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.framework.guest import tail, wait_for

SSHD = "/usr/sbin/sshd"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@dataclass
class OtherHost:
    """A network namespace that plays another machine, reachable over SSH."""

    namespace: str
    host_veth: str
    ns_veth: str
    host_address: str  # this machine's end of the veth pair
    address: str  # the other machine's address
    port: int
    key: Path  # the client's private key (the sshd accepts it for root)
    known_hosts: Path  # holds the sshd's host key
    empty_known_hosts: Path  # holds nothing: the host is unknown
    scratch: Path
    sshd_pid: int = 0

    @property
    def target(self) -> str:
        return f"root@{self.address}:{self.port}"

    def link(self, up: bool) -> None:
        """Take the host end of the veth pair down (a cut cable) or up again."""
        _ip("link", "set", self.host_veth, "up" if up else "down")

    def qemu_pids(self) -> list[int]:
        """PIDs of live QEMU processes inside the namespace (whoever started them)."""
        try:
            ns_inode = os.stat(f"/run/netns/{self.namespace}").st_ino
        except OSError:
            return []
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if os.stat(proc / "ns" / "net").st_ino != ns_inode:
                    continue
                stat = (proc / "stat").read_text()
                if "(qemu-system" in stat and ") Z" not in stat:
                    pids.append(int(proc.name))
        return pids


def _accepts(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), 1.0):
        return True
    return False


def _wait_sshd(sshd: subprocess.Popen[bytes], address: str, port: int, log: Path) -> None:
    """Wait until the sshd we started accepts connections; it must not exit meanwhile."""

    def listening() -> bool:
        assert sshd.poll() is None, f"sshd exited: {tail(log.read_text(errors='replace'))}"
        return _accepts(address, port)

    wait_for(
        listening,
        f"sshd listening on {address}:{port}",
        10.0,
        evidence=lambda: tail(log.read_text(errors="replace")),
    )


@contextlib.contextmanager
def other_host() -> Iterator[OtherHost]:
    pid = os.getpid()
    subnet = 10 + pid % 240
    scratch = Path(tempfile.mkdtemp(prefix="vk-ns-", dir="/tmp"))
    host = OtherHost(
        namespace=f"vmckpt-t{pid}",
        host_veth=f"vkh{pid}"[:15],
        ns_veth=f"vkn{pid}"[:15],
        host_address=f"10.200.{subnet}.1",
        address=f"10.200.{subnet}.2",
        port=22,
        key=scratch / "id_ed25519",
        known_hosts=scratch / "known_hosts",
        empty_known_hosts=scratch / "known_hosts.empty",
        scratch=scratch,
    )
    sshd: subprocess.Popen[bytes] | None = None
    try:
        _ip("netns", "add", host.namespace)
        _ip("link", "add", host.host_veth, "type", "veth", "peer", "name", host.ns_veth)
        _ip("link", "set", host.ns_veth, "netns", host.namespace)
        _ip("addr", "add", f"{host.host_address}/24", "dev", host.host_veth)
        _ip("link", "set", host.host_veth, "up")
        _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.ns_veth)
        _ip("-n", host.namespace, "link", "set", host.ns_veth, "up")
        _ip("-n", host.namespace, "link", "set", "lo", "up")

        host_key = scratch / "ssh_host_ed25519_key"
        for path in (host_key, host.key):
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True
            )
        authorized = scratch / "authorized_keys"
        shutil.copy(f"{host.key}.pub", authorized)
        authorized.chmod(0o600)
        public = Path(f"{host_key}.pub").read_text().split()
        host.known_hosts.write_text(f"{host.address} {public[0]} {public[1]}\n")
        host.empty_known_hosts.write_text("")
        config = scratch / "sshd_config"
        named = os.environ.get("VMCKPT_QEMU")
        qemu = f" VMCKPT_QEMU={named}" if named else ""
        config.write_text(
            f"ListenAddress {host.address}\nPort {host.port}\n"
            f"HostKey {host_key}\nPidFile {scratch}/sshd.pid\n"
            f"AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM no\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\nPubkeyAuthentication yes\n"
            "MaxSessions 50\nMaxStartups 50\nSubsystem sftp internal-sftp\n"
            # The other host's store keys, runtime and data directories live with the other
            # host (its scratch directory); it runs the QEMU the tests named for this one
            # (conftest's system_qemu), not whichever is newest there.
            f"SetEnv VMCKPT_KEYS_DIR={scratch}/keys VMCKPT_RUNTIME_DIR={scratch}/run "
            f"VMCKPT_DATA_DIR={scratch}/data{qemu}\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        # `ip netns exec` execs sshd, so the PID is sshd's own.
        sshd = subprocess.Popen(
            ["ip", "netns", "exec", host.namespace, SSHD, "-D", "-e", "-f", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=open(scratch / "sshd.log", "wb"),  # noqa: SIM115 - closed with the process
        )
        host.sshd_pid = sshd.pid
        _wait_sshd(sshd, host.address, host.port, scratch / "sshd.log")
        yield host
    finally:
        if sshd is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(sshd.pid, signal.SIGTERM)
            try:
                sshd.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(sshd.pid, signal.SIGKILL)
                sshd.wait(5)
        for pid in host.qemu_pids():  # a failed test may leave one; ours by namespace
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "link", "del", host.host_veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", host.namespace], capture_output=True, check=False)
        shutil.rmtree(scratch, ignore_errors=True)
