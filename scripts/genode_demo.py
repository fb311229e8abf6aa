"""Checkpoint and restore a Genode scenario booted from an ISO built with Genode's run tool.

``make genode GENODE_ISO=...`` boots the image under vmckpt and follows its
serial console; ``make genode-demo GENODE_ISO=...`` (``--demo``) waits for
the scenario to log, checkpoints it three times, stops it, restores the
middle layer and checks that the serial output after restore continues
where it was: the restored guest's first lines must be lines the original
run printed after that checkpoint began (in the same order), and the boot
banner must not appear again. This suits scenarios whose log is
deterministic, such as a timer-driven counter; a log with wall-clock
timestamps is not.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NoReturn

REPO = Path(__file__).resolve().parent.parent


def fail(message: str) -> NoReturn:
    raise SystemExit(f"genode: {message}")


def vmckpt(*args: str) -> str:
    print(f"$ vmckpt {shlex.join(args)}", flush=True)
    result = subprocess.run(
        [sys.executable, "-m", "vmckpt", *args], capture_output=True, text=True, cwd=REPO
    )
    sys.stdout.write(result.stdout)
    if result.returncode:
        fail(f"`vmckpt {args[0]}` failed: {result.stderr.strip()}")
    return result.stdout


def lines(store: Path, name: str) -> list[str]:
    log = store / "guests" / name / "serial.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    complete = text.rsplit("\n", 1)[0] if "\n" in text else ""
    return [line.strip() for line in complete.splitlines() if line.strip()]


def wait_lines(store: Path, name: str, count: int, timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        seen = lines(store, name)
        if len(seen) >= count:
            return seen
        if time.monotonic() > deadline:
            fail(f"guest {name} printed fewer than {count} serial lines in {timeout:.0f} s")
        time.sleep(0.5)


def continues(restored: list[str], original: list[str], start: int, probe: int = 3) -> bool:
    """Whether the first ``probe`` restored lines occur in order in ``original[start:]``."""
    want = restored[:probe]
    for index in range(start, len(original) - len(want) + 1):
        if original[index : index + len(want)] == want:
            return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iso", required=True, help="a bootable Genode ISO image")
    parser.add_argument("--store", default="genode-store")
    parser.add_argument("--memory", default="512M")
    parser.add_argument("--demo", action="store_true", help="checkpoint x3, restore the middle")
    parser.add_argument("--boot-timeout", type=float, default=180)
    args = parser.parse_args()
    iso = Path(args.iso)
    if not iso.is_file():
        fail(f"no Genode image at {iso!s} (build one with Genode's run tool, see README)")
    store = Path(args.store).resolve()
    name = "genode"
    if (store / "guests" / name / "guest.json").exists():
        subprocess.run(
            [sys.executable, "-m", "vmckpt", "stop", name, "--store", str(store)],
            capture_output=True,
            cwd=REPO,
        )
    run = [
        "run",
        name,
        "--store",
        str(store),
        "--create",
        "--iso",
        str(iso),
        "--memory",
        args.memory,
    ]
    if not args.demo:
        subprocess.run([sys.executable, "-m", "vmckpt", *run], cwd=REPO, check=False)
        return

    vmckpt(*run, "--detach")
    try:
        banner = wait_lines(store, name, 5, args.boot_timeout)[0]
        layers: list[tuple[str, int]] = []
        for _ in range(3):
            before = len(lines(store, name))
            out = vmckpt("checkpoint", name, "--store", str(store), "--json")
            layers.append((str(json.loads(out)["layer"]), before))
            wait_lines(store, name, len(lines(store, name)) + 3, 60)
        original = lines(store, name)
        vmckpt("stop", name, "--store", str(store))
        middle, before = layers[1]
        vmckpt("restore", "--store", str(store), "--layer", middle, "--detach")
        restored = wait_lines(store, name, 3, 60)
    finally:
        subprocess.run(
            [sys.executable, "-m", "vmckpt", "stop", name, "--store", str(store)],
            capture_output=True,
            cwd=REPO,
        )
    if banner in restored:
        fail(f"the restored guest printed its boot banner again ({banner!r}): it rebooted")
    if not continues(restored, original, max(before - 1, 0)):
        fail(
            f"the serial output after restoring {middle} does not continue the original run: "
            f"restored {restored[:3]!r}, original after the checkpoint {original[before:][:6]!r}"
        )
    print(f"genode: restored layer {middle} continues with {restored[0]!r}")


if __name__ == "__main__":
    main()
