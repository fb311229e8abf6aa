"""The microkernel test systems (Genode on base-hw, Fiasco.OC with L4Re): where their images
are, how vmckpt runs them, and what their consoles say.

Both systems print a deterministic tick line every 200 ms (the images' READMEs in
guest/genode-hw-pc/ and guest/fiasco-l4re/): tick n has the same checksum on every boot and
after every restore, so a restored system is checked line by line, the way
the Linux test guest's STATE lines are (tests/framework/guest.py). Their
consoles carry ANSI colour codes and CR LF line ends; :func:`console_lines`
strips both, and keeps only complete lines (a line still being written, or
the rest of a line a checkpoint cut, never counts as a tick).

Images are found in ``$GUEST_IMAGES``, else ``guest/`` of this repository (where
they are kept, with their sources and licences), unless ``GENODE_ISO``,
``GENODE_MULTIBOOT_DIR`` or ``FIASCO_IMAGE`` name them. A missing image is a
:class:`MissingImage` whose message says in one line where to put it.

Shared by the tests (tests/test_microkernels.py), the benchmark
(benchmarks/microkernels.py) and the demos (scripts/microkernel_demo.py).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.framework.guest import REPO, Vmckpt, wait_for
from vmckpt.machine.qemu import SERIAL_LOG

T = TypeVar("T")
GENODE_DIR = "genode-hw-pc"
FIASCO_DIR = "fiasco-l4re"

# CSI sequences (ESC [ parameters intermediates final) and two-byte escapes (ESC c resets).
ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_]|c)")


class MissingImage(Exception):
    """A system's image is not where vmckpt looks for it (the message says where to put it)."""


def shared_guest_dirs() -> list[Path]:
    """Where the guest images are looked for, in order."""
    candidates = [
        *([Path(os.environ["GUEST_IMAGES"])] if os.environ.get("GUEST_IMAGES") else []),
        REPO / "guest",
    ]
    unique: list[Path] = []
    for path in candidates:
        if path not in unique:
            unique.append(path)
    return unique


def find_image(variable: str, relative: str, what: str) -> Path:
    """``$variable`` if set, else the first shared guest directory that holds ``relative``."""
    given = os.environ.get(variable)
    if given:
        path = Path(given).expanduser().resolve()
        if path.exists():
            return path
        raise MissingImage(f"no {what} at {variable}={given}: put {Path(relative).name} there")
    dirs = shared_guest_dirs()
    for directory in dirs:
        if (directory / relative).exists():
            return directory / relative
    raise MissingImage(
        f"no {what}: put {relative} in {dirs[0]} (looked in {', '.join(map(str, dirs))}), "
        f"or set {variable}=PATH"
    )


def genode_iso() -> Path:
    return find_image("GENODE_ISO", f"{GENODE_DIR}/genode-hw-pc-ckpt_counter.iso", "Genode ISO")


def genode_multiboot_dir() -> Path:
    """The directory with Genode's multiboot pair, ``bender`` and ``image-hw.elf``."""
    directory = find_image(
        "GENODE_MULTIBOOT_DIR", f"{GENODE_DIR}/multiboot", "Genode multiboot directory"
    )
    for name in ("bender", "image-hw.elf"):
        if not (directory / name).is_file():
            raise MissingImage(f"no {name} in the Genode multiboot directory {directory}")
    return directory


def fiasco_image() -> Path:
    return find_image("FIASCO_IMAGE", f"{FIASCO_DIR}/bootstrap_ticker.elf", "Fiasco.OC ticker")


def fiasco_hello_image() -> Path:
    """Fiasco.OC's hello-cfg image: "Hello World!" once a second, no checksums at all."""
    return find_image(
        "FIASCO_HELLO_IMAGE", f"{FIASCO_DIR}/bootstrap_hello-cfg.elf", "Fiasco.OC hello image"
    )


def require(find: Callable[[], T]) -> T:
    """``find()``, or the calling test fails with MissingImage's one line (never skips)."""
    try:
        return find()
    except MissingImage as exc:
        message = str(exc)
    import pytest  # only tests get here: the demos and benchmarks report it themselves

    pytest.fail(message, pytrace=False)


# -- consoles ---------------------------------------------------------------------------


def console_lines(raw: bytes) -> list[str]:
    """The complete lines of a console log: ANSI codes and CRs removed, blanks dropped."""
    text = raw.decode("latin-1")
    complete = text.split("\n")[:-1]  # the last piece has no newline yet
    lines = (ANSI.sub("", line.replace("\r", "")).strip() for line in complete)
    return [line for line in lines if line]


@dataclass(frozen=True)
class Tick:
    n: int
    sum: str  # the deterministic part: Genode's sum; Fiasco's sum and PRNG state
    ok: bool  # Fiasco's own recount matched (always True for Genode, which has none)


GENODE_TICK = re.compile(
    r"^\[init -> test-ckpt_counter\] tick=(?P<n>\d+) sum=(?P<sum>0x[0-9a-f]{16}) ms=\d+$"
)
FIASCO_TICK = re.compile(
    r"^ticker +\| TICK (?P<n>\d+) t_us=\d+ sum=(?P<sum>[0-9a-f]{8}) "
    r"rng=(?P<rng>[0-9a-f]{8}) (?P<status>ok|MISMATCH)$"
)


@dataclass(frozen=True)
class System:
    """One microkernel test system: how to boot it and how to read its console."""

    name: str  # genode-iso, genode-multiboot, fiasco
    title: str
    memory: str
    machine: str
    cpu: str
    tick: re.Pattern[str]
    banner: re.Pattern[str]  # a boot message: seen after a restore, the system rebooted
    ticks_expected_after_s: float = 20.0  # first tick after QEMU starts, with a margin (TCG)

    def media_args(self) -> list[str]:
        """``vmckpt run`` arguments for the boot media (MissingImage if absent)."""
        if self.name == "genode-iso":
            return ["--iso", str(genode_iso())]
        if self.name == "genode-multiboot":
            directory = genode_multiboot_dir()
            return [
                "--kernel", str(directory / "bender"), "--append", "serial",
                "--initrd", str(directory / "image-hw.elf"),
            ]  # fmt: skip
        return ["--kernel", str(fiasco_image())]

    def run_args(self) -> list[str]:
        """Every ``vmckpt run`` argument the system needs, besides name, store and accel."""
        args = [*self.media_args(), "--memory", self.memory, "--machine", self.machine]
        return [*args, "--cpu", self.cpu] if self.cpu else args

    def ticks(self, lines: Iterable[str]) -> list[Tick]:
        found = []
        for line in lines:
            match = self.tick.match(line)
            if match is None:
                continue
            groups = match.groupdict()
            key = f"{groups['sum']} {groups['rng']}" if "rng" in groups else groups["sum"]
            found.append(Tick(int(groups["n"]), key, groups.get("status", "ok") == "ok"))
        return found

    def reference_ticks(self) -> list[Tick]:
        """Ticks of the reference run shipped beside the image, if any (Genode: 1-169)."""
        if self.name == "genode-iso":
            reference = genode_iso().parent / "reference-console.txt"
        elif self.name == "genode-multiboot":
            reference = genode_multiboot_dir().parent / "reference-console.txt"
        else:
            return []
        return self.ticks(console_lines(reference.read_bytes())) if reference.is_file() else []


GENODE_BANNER = re.compile(r"Bender: Hello World|kernel initialized|^Genode \d+\.\d+")
FIASCO_BANNER = re.compile(r"L4 Bootstrapper|Welcome to the L4Re Microkernel")

SYSTEMS = {
    "genode-iso": System(
        "genode-iso", "Genode 26.02 on base-hw, GRUB ISO", "512M", "q35", "max",
        GENODE_TICK, GENODE_BANNER,
    ),
    "genode-multiboot": System(
        "genode-multiboot", "Genode 26.02 on base-hw, multiboot (bender)", "512M", "q35", "max",
        GENODE_TICK, GENODE_BANNER,
    ),
    "fiasco": System(
        "fiasco", "Fiasco.OC + L4Re ticker, multiboot", "512M", "pc", "",
        FIASCO_TICK, FIASCO_BANNER,
    ),
}  # fmt: skip


# -- checking a restored run --------------------------------------------------------------


class TickLedger:
    """Every tick seen in any run of one system, by number: a tick printed twice (by the
    original and by a restored run, or by two restored runs) must carry the same sums."""

    def __init__(self, reference: Iterable[Tick] = ()) -> None:
        self.sums: dict[int, str] = {}
        self.sources: dict[int, str] = {}
        self.add("reference", reference)

    def add(self, source: str, ticks: Iterable[Tick]) -> None:
        for tick in ticks:
            known = self.sums.get(tick.n)
            if known is not None and known != tick.sum:
                raise AssertionError(
                    f"tick {tick.n}: {source} printed {tick.sum}, "
                    f"{self.sources[tick.n]} printed {known}"
                )
            self.sums.setdefault(tick.n, tick.sum)
            self.sources.setdefault(tick.n, source)


def check_continuation(
    system: System,
    lines: list[str],
    ledger: TickLedger,
    *,
    source: str,
    after: tuple[int, int],
) -> list[Tick]:
    """Check a restored run's console: it continues at the tick after the checkpoint
    (``after`` = the last tick printed before the checkpoint began and once it returned),
    counts on by one, never reboots, never reports MISMATCH, and every tick it shares with
    another run has that run's sums. Returns its ticks; AssertionError says what is wrong."""
    ticks = system.ticks(lines)
    assert ticks, f"{source}: no tick line; console ends {lines[-5:]!r}"
    first = ticks[0].n
    assert after[0] + 1 <= first <= after[1] + 1, (
        f"{source}: continues at tick {first}, the checkpoint was taken between ticks "
        f"{after[0]} and {after[1]}"
    )
    numbers = [t.n for t in ticks]
    assert numbers == list(range(first, first + len(numbers))), (
        f"{source}: ticks do not count on by one: {numbers}"
    )
    assert all(t.ok for t in ticks), f"{source}: MISMATCH at {[t.n for t in ticks if not t.ok]}"
    banners = [line for line in lines if system.banner.search(line)]
    assert not banners, f"{source}: the system booted again: {banners[:3]}"
    shared = [t for t in ticks if t.n in ledger.sums]
    assert shared, f"{source}: no tick in common with an earlier run (ticks {numbers})"
    ledger.add(source, ticks)
    return ticks


# -- a system run by the vmckpt CLI (tests/framework/guest.py's runner) --------------------


def console(runner: Vmckpt, name: str) -> list[str]:
    """The complete, cleaned lines of a guest's console in its current life."""
    log = runner.runtime(name) / SERIAL_LOG
    return console_lines(log.read_bytes() if log.exists() else b"")


def wait_ticks(
    runner: Vmckpt, system: System, name: str, count: int, timeout: float = 60.0
) -> list[Tick]:
    """Wait until the guest's console holds ``count`` ticks; AssertionError with its tail if
    it does not within ``timeout``."""
    return wait_for(
        lambda: ticks if len(ticks := system.ticks(console(runner, name))) >= count else None,
        f"{system.name} guest {name} printing {count} ticks",
        timeout,
        evidence=lambda: (
            f"{len(system.ticks(console(runner, name)))} ticks; console ends:\n"
            + "\n".join(console(runner, name)[-5:])
        ),
    )


def last_tick(runner: Vmckpt, system: System, name: str) -> int:
    ticks = system.ticks(console(runner, name))
    return ticks[-1].n if ticks else -1


def run_system(runner: Vmckpt, system: System, name: str, *extra: str) -> None:
    """``vmckpt run NAME`` of the system, detached, under TCG."""
    runner.started.add(name)
    runner(
        "run", name, "--store", str(runner.store), "--create", *system.run_args(),
        "--accel", "tcg", "--detach", *extra,
    )  # fmt: skip
