"""Migration benchmark: downtime, total time and bytes sent, vmckpt against plain QEMU.

For each guest size and dirty rate, one guest is booted here and moved to the
other host and back several ways, in the same run:

- ``qemu-raw``: QEMU's own ``migrate tcp:`` into a QEMU started by hand there
  with ``-incoming tcp:`` (no vmckpt; the baseline); the source is resumed after.
- ``vmckpt-qemu``: ``vmckpt migrate`` (mechanism qemu), there and back.
- ``vmckpt-layers-cold``: mechanism layers to a store that holds no layer.
- ``vmckpt-layers-warm``: the same to a store that holds the guest's earlier layers.

Downtime is the guest's pause: for ``qemu-raw`` QEMU's own figure; for
``vmckpt-qemu`` from the source QEMU's STOP event to the destination QEMU's
RESUME event (both hosts' clocks; the same clock here); for the layers
mechanism from the stop to the restore there reporting the guest running.
Benchmarks print numbers; nothing here asserts a timing.
"""

from __future__ import annotations

import dataclasses
import shlex
import tempfile
import time
from pathlib import Path
from typing import Any

from vmckpt.errors import CheckpointError
from vmckpt.guests.local import LocalGuest
from vmckpt.guests.remote import RemoteTarget
from vmckpt.images import Store
from vmckpt.machine.binary import qemu_binary, qemu_version, version_tuple
from vmckpt.machine.qemu import Launch, command_line
from vmckpt.machine.spec import BootMedium, GuestSpec
from vmckpt.mechanisms.migrate import MigrateSettings, migrate_by_layers, migrate_guest
from vmckpt.session import MigrationSession

BOOT_WAIT_S = 120.0


def _wait_booted(store: Store, name: str, states: int = 3) -> None:
    runtime = store.host.runtime_dir(name)
    deadline = time.monotonic() + BOOT_WAIT_S
    while time.monotonic() < deadline:
        text = (runtime / "serial.log").read_text(errors="replace")
        if text.count("STATE seq=") >= states:
            return
        time.sleep(0.5)
    raise RuntimeError(f"guest {name} did not boot within {BOOT_WAIT_S:.0f} s")


def _row(memory: int, pages: int, method: str, **values: Any) -> dict[str, Any]:
    return {"memory_mib": memory, "pages_per_step": pages, "method": method, **values}


def _raw_qemu_migration(
    store: Store, name: str, target: RemoteTarget, listen: str, port: int
) -> dict[str, Any]:
    """QEMU's own migrate tcp: into a QEMU started there by hand; the source resumes after."""
    guest = LocalGuest(store, name)
    process = guest.process()
    ssh, _ = target.connect()
    remote_dir = f"/tmp/vmckpt-bench-{int(time.time() * 1000)}"
    with ssh, process.monitor() as mon:
        binary = qemu_binary()
        launch = Launch(
            name=f"{name}-raw", accel="tcg", serial_log=Path(f"{remote_dir}/serial.log"),
            machine_type=mon.machine_type(),
        )  # fmt: skip
        command = command_line(
            guest.spec(), launch, binary="qemu-system-x86_64",
            qemu_major=version_tuple(qemu_version(binary))[0],
        )  # fmt: skip
        command += ["-incoming", f"tcp:{listen}:{port}", "-daemonize"]
        command += ["-pidfile", f"{remote_dir}/qemu.pid"]
        start = f"mkdir -p {remote_dir} && {' '.join(shlex.quote(c) for c in command)}"
        code, _, err = ssh.run(["sh", "-c", start], timeout=60)
        if code != 0:
            raise RuntimeError(f"raw QEMU did not start there: {err.strip()}")
        try:
            session = MigrationSession(
                mon, vm=name, error=CheckpointError, capabilities={"events": True},
                parameters={"downtime-limit": 50}, timeout_s=600,
            )  # fmt: skip
            with session:
                started = time.monotonic()
                session.start(f"tcp:{listen}:{port}")
                session.wait()
                elapsed = time.monotonic() - started
                info = mon.query_migrate()
            return {
                "downtime_ms": info.downtime_ms,
                "qemu_downtime_ms": info.downtime_ms,
                "total_s": round(elapsed, 3),
                "bytes_sent": info.transferred,
            }
        finally:
            # The QEMU there is the benchmark's own, started above; its PID is in its pidfile.
            ssh.run(
                ["sh", "-c", f"kill $(cat {remote_dir}/qemu.pid); sleep 0.5; rm -rf {remote_dir}"],
                timeout=30,
            )


def run_migration_bench(
    target: RemoteTarget,
    *,
    kernel: Path,
    initrd: Path,
    memories_mib: tuple[int, ...] = (256, 1024),
    pages_per_step: tuple[int, ...] = (0, 100),
    listen: str | None = None,
    raw_port: int = 47001,
    scratch: Path | None = None,
) -> list[dict[str, Any]]:
    """Run every method for every guest size and dirty rate; one result row per migration."""
    qemu_binary()  # fail early without QEMU
    rows: list[dict[str, Any]] = []
    base = Path(scratch or tempfile.mkdtemp(prefix="vk-bm-", dir="/tmp"))
    media = (BootMedium.of("kernel", kernel), BootMedium.of("initrd", initrd))
    settings = MigrateSettings(listen=listen)
    for memory in memories_mib:
        for pages in pages_per_step:
            tag = f"m{memory}p{pages}"
            store = Store.create(base / tag / "local", parents=True)
            name = "bench"
            spec = GuestSpec(
                memory_mib=memory,
                accel="tcg",
                media=media,
                append=f"console=ttyS0 quiet panic=-1 vmckpt.buf_mb=64 vmckpt.pages={pages}",
            )
            guest = LocalGuest.start(store, name, spec)
            try:
                _wait_booted(store, name)
                ssh, _ = target.connect()
                with ssh:
                    address = listen or ssh.peer_address
                raw = _raw_qemu_migration(store, name, target, address, raw_port)
                rows.append(_row(memory, pages, "qemu-raw", **raw))

                there = dataclasses.replace(target, store=str(base / tag / "remote-q"))
                out = migrate_guest(store, name, there, settings)
                rows.append(_row(memory, pages, "vmckpt-qemu", **_values(out.to_dict())))
                back = migrate_guest(store, name, None, settings)
                rows.append(_row(memory, pages, "vmckpt-qemu-back", **_values(back.to_dict())))

                layers = dataclasses.replace(target, store=str(base / tag / "remote-l"))
                cold = migrate_by_layers(store, name, layers, settings)
                rows.append(_row(memory, pages, "vmckpt-layers-cold", **_values(cold.to_dict())))
                migrate_guest(store, name, None, settings)
                time.sleep(2)
                warm = migrate_by_layers(store, name, layers, settings)
                rows.append(_row(memory, pages, "vmckpt-layers-warm", **_values(warm.to_dict())))
                migrate_guest(store, name, None, settings)
            finally:
                guest = LocalGuest(store, name)
                process = guest.record.process
                if process is not None and process.alive():
                    guest.stop()
    return rows


def _values(result: dict[str, Any]) -> dict[str, Any]:
    return {
        "downtime_ms": result.get("downtime_ms"),
        "qemu_downtime_ms": result.get("qemu_downtime_ms"),
        "total_s": result.get("total_s"),
        "bytes_sent": result.get("bytes_sent"),
    }


def format_rows(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'MiB':>5} {'pages/step':>10} {'method':<20} {'downtime ms':>12} {'QEMU ms':>8} "
        f"{'total s':>8} {'bytes sent':>13}"
    ]
    for row in rows:
        downtime = row["downtime_ms"]
        qemu = row["qemu_downtime_ms"]
        lines.append(
            f"{row['memory_mib']:>5} {row['pages_per_step']:>10} {row['method']:<20} "
            f"{'-' if downtime is None else f'{downtime:.1f}':>12} "
            f"{'-' if qemu is None else qemu:>8} {row['total_s']:>8.2f} {row['bytes_sent']:>13}"
        )
    return "\n".join(lines)
