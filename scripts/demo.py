"""The README's demo: boot the test guest, checkpoint it three times, restore the middle layer.

The restore is lazy (the guest runs at once, a page server brings its pages in from the
store); the demo says how long the guest took to run, then restores the same layer in full
(``--no-lazy``) beside it for comparison. Every step runs the real ``vmckpt`` command and
prints it first, so the output reads like a terminal session a user could type.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from vmckpt.errors import StoreError
from vmckpt.images import Store, keys
from vmckpt.machine.qemu import SERIAL_LOG

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "guest" / "build"
STATE = re.compile(r"^STATE seq=(\d+) sum=([0-9a-f]{16}) ok$", re.M)


def guest_file(store: Path, name: str, file: str) -> Path:
    """A file of a guest's runtime directory on this host (the store knows where it is)."""
    try:
        return Store(store).host.runtime_path(name) / file
    except StoreError:
        return store / ".no-such-store" / file  # no store yet: a path that does not exist


def vmckpt(*args: str, quiet: bool = False) -> str:
    """Run the vmckpt command as a user would type it (the store comes from VMCKPT_STORE)."""
    print(f"\n$ vmckpt {shlex.join(args)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "vmckpt", *args], capture_output=True, text=True, cwd=REPO
    )
    if not quiet or result.returncode:
        sys.stdout.write(result.stdout)
    if result.returncode:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"demo: `vmckpt {args[0]}` failed (exit {result.returncode})")
    return result.stdout


def states(store: Path, name: str) -> list[tuple[int, str]]:
    log = guest_file(store, name, SERIAL_LOG)
    text = log.read_text(errors="replace") if log.exists() else ""
    return [(int(m.group(1)), m.group(2)) for m in STATE.finditer(text)]


def wait_for_steps(store: Path, name: str, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(states(store, name)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"demo: guest {name} printed no workload output in {timeout:.0f} s")
        time.sleep(0.2)


def pages_in(store: Path, name: str, timeout: float = 120) -> None:
    """Wait until the lazy restore's page server has brought every page in; say how."""
    deadline = time.monotonic() + timeout
    while guest_file(store, name, "pageserver.json").exists():
        if time.monotonic() > deadline:
            raise SystemExit("demo: the page server did not finish")
        time.sleep(0.05)
    done = json.loads(guest_file(store, name, "restored.json").read_text())
    print(
        f"  (every page in after {done['all_in_s']:.2f} s: {done['pushed']} pushed in the "
        f"background, {done['on_demand']} sent when the guest asked, {done['duplicates']} "
        "repeated requests dropped)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--store", default="demo-store")
    parser.add_argument("--memory", default="512M")
    args = parser.parse_args()
    store = Path(args.store).resolve()
    name = "demo"

    if guest_file(store, name, "guest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "vmckpt", "stop", name, "--store", str(store)],
            capture_output=True,
            cwd=REPO,
        )
    with contextlib.suppress(OSError, ValueError, KeyError, StoreError):
        # The previous demo store's key goes with it (it seals nothing else).
        store_id = json.loads((store / "vmckpt-store.json").read_text())["store_id"]
        keys.key_path(store_id).unlink()
    shutil.rmtree(store, ignore_errors=True)
    os.environ["VMCKPT_STORE"] = str(store)
    print(f"$ export VMCKPT_STORE={store}")

    vmckpt("check")
    vmckpt("init", str(store))
    vmckpt(
        "run", name,
        "--kernel", str(BUILD / "vmlinuz"), "--initrd", str(BUILD / "initrd.img"),
        "--append", "console=ttyS0 quiet panic=-1 vmckpt.buf_mb=64 vmckpt.pages=4",
        "--memory", args.memory, "--detach",
    )  # fmt: skip
    print("(waiting for the guest to boot and its workload to start)", flush=True)
    wait_for_steps(store, name, 10)

    layers: list[tuple[str, int, int]] = []  # layer, and the seq range it was taken in
    for _ in range(3):
        time.sleep(2)
        before = states(store, name)[-1][0]
        out = vmckpt("checkpoint", name)
        after = states(store, name)[-1][0]
        match = re.search(r"^layer (\S+)", out, re.M)
        if not match:
            raise SystemExit(f"demo: no layer id in {out!r}")
        layers.append((match.group(1), before, after))
        print(f"  (taken while the guest went from seq {before} to seq {after})")
    time.sleep(1)
    original = dict(states(store, name))
    listing = subprocess.run(
        [sys.executable, "-m", "vmckpt", "list", "--json"], capture_output=True, text=True,
        cwd=REPO, check=True,
    )  # fmt: skip
    guest = next(g for g in json.loads(listing.stdout)["guests"] if g["name"] == name)
    if guest.get("mechanism") != "colo":  # the default install runs QEMU 11: colo
        print(f"\n(these checkpoints are {guest.get('mechanism')}, not colo: "
              f"{guest.get('mechanism_reason')})")  # fmt: skip
    vmckpt("list")
    vmckpt("stop", name)

    middle, before, after = layers[1]
    started = time.monotonic()
    row = json.loads(vmckpt("restore", "--layer", middle, "--name", name, "--detach", "--json"))
    returned = time.monotonic() - started
    print(
        f"  (lazy: the guest ran {row['total_s'] * 1000:.0f} ms after the restore began its work, "
        f"QEMU's RESUME came {row['resume_ms']:.1f} ms after migrate-incoming; the vmckpt "
        f"command, Python's start included, took {returned * 1000:.0f} ms; page server PID "
        f"{row['page_server']} brings in the rest)"
    )
    wait_for_steps(store, name, 1)
    print(f"  (its first console line came {time.monotonic() - started:.2f} s after the command)")
    pages_in(store, name)
    wait_for_steps(store, name, 20)
    restored = states(store, name)
    first, last = restored[0], restored[-1]
    agree = all(original.get(seq, s) == s for seq, s in restored)
    vmckpt("console", name, quiet=True)
    print(
        f"the restored guest went on from seq {first[0]} (layer {middle} was taken between "
        f"seq {before} and {after}) to seq {last[0]}"
    )
    print(
        "its checksums "
        + ("match the original run's, step for step" if agree else "DIFFER from the original run")
    )
    vmckpt("verify")
    full = json.loads(
        vmckpt("restore", "--layer", middle, "--name", f"{name}-full", "--no-lazy", "--detach",
               "--watch", "0", "--json")
    )  # fmt: skip
    print(
        f"  (the same layer restored in full: the guest ran {full['total_s'] * 1000:.0f} ms "
        f"after the restore began, RESUME {full['resume_ms']:.1f} ms after migrate-incoming; "
        f"lazily: {row['total_s'] * 1000:.0f} ms and {row['resume_ms']:.1f} ms)"
    )
    vmckpt("stop", f"{name}-full")
    vmckpt("stop", name)
    if not agree:
        raise SystemExit("demo: the restored guest diverged")
    print("\ndemo done: the store stays in", store)


if __name__ == "__main__":
    main()
