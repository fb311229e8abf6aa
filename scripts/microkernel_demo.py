"""Genode and Fiasco.OC under vmckpt: boot, checkpoint, restore, and check every tick.

``make genode`` boots the Genode ISO (``--machine q35 --cpu max``, what base-hw
on pc needs) and follows its serial console; ``make genode-demo`` and ``make
fiasco-demo`` (``--demo``) wait for the system's tick lines, checkpoint it
three times, stop it, restore the middle layer, and check the restored
console line by line: it must continue at the tick after the checkpoint,
count on by one, and print for every tick the checksums the original run
printed (ANSI colour codes stripped; Genode's ticks are also compared with
the reference run shipped with the image), never reboot, never MISMATCH.
Last, ``vmckpt verify --boot`` restores the last layer in a throw-away QEMU
and says whether it comes up alive.

Every step runs the real ``vmckpt`` command and prints it first. The images
come from guest/ of this repository unless GENODE_ISO, GENODE_MULTIBOOT_DIR or
FIASCO_IMAGE say otherwise (tests/framework/microkernel.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.framework.microkernel import (  # noqa: E402  (after the path is set)
    SYSTEMS,
    MissingImage,
    System,
    Tick,
    TickLedger,
    check_continuation,
    console_lines,
)
from vmckpt.images import Store  # noqa: E402
from vmckpt.machine.qemu import SERIAL_LOG  # noqa: E402

NAME = "demo"


def fail(system: System, message: str) -> NoReturn:
    raise SystemExit(f"{system.name}: {message}")


def vmckpt(system: System, *args: str, show: bool = True) -> str:
    """Run a vmckpt command as a user would type it; fail the demo if it fails."""
    print(f"\n$ vmckpt {shlex.join(args)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "vmckpt", *args], capture_output=True, text=True, cwd=REPO
    )
    if show or result.returncode:
        sys.stdout.write(result.stdout)
    if result.returncode:
        sys.stderr.write(result.stderr)
        fail(system, f"`vmckpt {args[0]}` failed (exit {result.returncode})")
    return result.stdout


def ticks(system: System, store: Path, name: str) -> list[Tick]:
    log = Store(store).host.runtime_path(name) / SERIAL_LOG
    return system.ticks(console_lines(log.read_bytes() if log.exists() else b""))


def wait_ticks(system: System, store: Path, name: str, count: int, timeout: float) -> list[Tick]:
    deadline = time.monotonic() + timeout
    while True:
        seen = ticks(system, store, name)
        if len(seen) >= count:
            return seen
        if time.monotonic() > deadline:
            fail(system, f"guest {name} printed {len(seen)} of {count} ticks in {timeout:.0f} s")
        time.sleep(0.2)


def stop_quietly(store: Path, name: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "vmckpt", "stop", name, "--store", str(store)],
        capture_output=True,
        cwd=REPO,
    )


def demo(system: System, store: Path, boot_timeout: float) -> None:
    st = ("--store", str(store))
    vmckpt(system, "run", NAME, *st, "--create", *system.run_args(), "--detach")
    print(f"(waiting for {system.title} to print its ticks)", flush=True)
    wait_ticks(system, store, NAME, 5, boot_timeout)
    layers: list[tuple[str, int, int, dict[str, object]]] = []
    for _ in range(3):
        before = ticks(system, store, NAME)[-1].n
        row = json.loads(vmckpt(system, "checkpoint", NAME, *st, "--json"))
        after = ticks(system, store, NAME)[-1].n
        layers.append((str(row["layer"]), before, after, row))
        print(f"  (taken while the system went from tick {before} to tick {after})")
        wait_ticks(system, store, NAME, len(ticks(system, store, NAME)) + 5, 60)
    original = ticks(system, store, NAME)
    vmckpt(system, "list", *st)
    vmckpt(system, "stop", NAME, *st)

    middle, before, after, _row = layers[1]
    restored_json = vmckpt(
        system, "restore", *st, "--layer", middle, "--name", NAME, "--detach", "--json"
    )
    restore = json.loads(restored_json)
    try:
        wait_ticks(system, store, NAME, 15, 60)
        log = Store(store).host.runtime_path(NAME) / SERIAL_LOG
        lines = console_lines(log.read_bytes())
    finally:
        stop_quietly(store, NAME)
    ledger = TickLedger(system.reference_ticks())
    try:
        ledger.add("the original run", original)
        restored = check_continuation(
            system, lines, ledger, source="the restored system", after=(before, after)
        )
    except AssertionError as exc:
        fail(system, f"the restored system does not continue the original run: {exc}")
    by_n = {t.n: t.sum for t in original}
    print(f"\nlayer {middle} was taken between ticks {before} and {after}; the restored system:")
    for tick in restored[:5]:
        same = "same as the original run" if by_n.get(tick.n) == tick.sum else "(after its end)"
        print(f"  tick {tick.n:>4}  {tick.sum}  {same}")
    compared = sum(1 for t in restored if t.n in by_n)
    reference = len(system.reference_ticks())
    print(
        f"{len(restored)} ticks, {compared} compared with the original run"
        + (f" (and with the {reference}-tick reference run)" if reference else "")
        + ": every checksum equal, no reboot, no MISMATCH"
    )

    print("\nmeasured:")
    for layer, _b, _a, row in layers:
        print(
            f"  layer {layer}: pause {row['pause_ms']} ms, {row['pages_stored']} pages, "
            f"{int(str(row['bytes'])) / 1e6:.1f} MB, {row['total_s']} s"
        )
    print(
        f"  restore of {middle}: {restore['total_s']} s in all (compose {restore['compose_s']} s, "
        f"load {restore['load_s']} s, 1 s of it watching the restored guest)"
    )
    vmckpt(system, "verify", *st, "--boot", layers[-1][0], "--seconds", "3")
    print(f"\n{system.name} demo done: the store stays in {store}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("system", choices=sorted(SYSTEMS))
    parser.add_argument("--store", default="microkernel-store")
    parser.add_argument("--demo", action="store_true", help="checkpoint x3, restore the middle")
    parser.add_argument("--boot-timeout", type=float, default=120)
    args = parser.parse_args()
    system = SYSTEMS[args.system]
    try:
        run_args = system.run_args()
    except MissingImage as exc:
        raise SystemExit(f"{system.name}: {exc}") from None
    store = Path(args.store).resolve()
    stop_quietly(store, NAME)
    if not args.demo:
        command = ["run", NAME, "--store", str(store), "--create", *run_args]
        print(f"$ vmckpt {shlex.join(command)}   (Ctrl-C stops it)", flush=True)
        child = subprocess.Popen([sys.executable, "-m", "vmckpt", *command], cwd=REPO)
        # A Ctrl-C reaches vmckpt too, which stops the guest: wait for it to finish that.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            child.wait()
        finally:
            signal.signal(signal.SIGINT, previous)
        return
    if store.exists() and any(store.iterdir()) and not (store / "vmckpt-store.json").exists():
        fail(system, f"{store} is not a vmckpt store: name another with --store (STORE=)")
    shutil.rmtree(store, ignore_errors=True)  # a fresh demo store each time
    try:
        demo(system, store, args.boot_timeout)
    finally:
        stop_quietly(store, NAME)


if __name__ == "__main__":
    main()
