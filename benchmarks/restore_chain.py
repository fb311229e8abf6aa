"""Restore time against chain length: compose layer 1, 100 and 1000 of one chain.

The chain is built synthetically with the images API (no QEMU): a guest of
``--memory`` RAM (one ``pc.ram`` block plus the small blocks a real pc guest
has), whose base layer holds random data in ``--fill`` of its pages, then
``--layers - 1`` deltas that each rewrite ``--dirty`` pages drawn from a hot
region of ``--hot`` pages (a workload rewriting a buffer, as the test guest
does: ~160 pages per layer were measured on a real guest, docs/DESIGN), a few
of them cleared to zero. What is timed is what every restore does before it
starts QEMU: :func:`vmckpt.restore.load_layer_image` (resolve, verify, compose
the chain into the guest's RAM); starting QEMU and loading the stream do not
depend on the chain. Each is compared with restoring a one-layer chain of the
same guest state (a base layer holding the very image of layer N, written to
a second store), which is what the chain's length should not add to. The
store's files are in the page cache (just written), so the numbers are CPU
time, not disk time. Each composed image is compared with the image the chain
was built from (outside the timing).

    python3 -m benchmarks.restore_chain --layers 1000 --at 1,100,1000

With ``--encrypt`` the same chain (the same seed: the same layers) is also written into an
encrypted store (``vmckpt init --encrypt``) and composed there, and the table sets the two
side by side.

Then it prunes the chain to its ``--prune-keep`` newest layers and times that.
With ``--real`` it measures whole restores instead: the test guest is booted
and checkpointed once (a real base layer), ``--layers - 1`` deltas rewrite
pages of it with the data they already hold (so every layer is the same guest
state and restoring layer N costs against restoring layer 1 exactly what the
chain's length adds), and each of the layers is restored into a new QEMU by
:func:`vmckpt.restore.restore_guest` (the guest is checked to run on, then
stopped).

Benchmarks print numbers; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vmckpt.guests.local import LocalGuest
from vmckpt.images import LayerContent, Store
from vmckpt.images.maintenance import prune
from vmckpt.images.retention import KeepRules
from vmckpt.machine.binary import parse_memory
from vmckpt.machine.spec import BootMedium, GuestSpec
from vmckpt.mechanisms.precopy import take_checkpoint
from vmckpt.mechanisms.restore import load_layer_image, restore_guest
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage

SMALL_BLOCKS = (("vga.vram", 16 << 20), ("pc.bios", 256 << 10), ("pc.rom", 128 << 10))
REPO_GUEST = Path(__file__).resolve().parent.parent / "guest" / "build"
GUEST = "chain"


@dataclass
class Row:
    layer_number: int
    layer: str
    chain: int
    nonzero_pages: int
    median_s: float
    min_s: float
    runs: list[float]
    one_layer_median_s: float  # the same state as a one-layer chain
    one_layer_runs: list[float]
    encrypted_median_s: float | None = None  # --encrypt: the same chain, encrypted
    encrypted_runs: list[float] | None = None


def image_digest(ram: RamImage) -> str:
    digest = hashlib.sha256()
    for block in ram.blocks:
        digest.update(block.idstr.encode())
        digest.update(ram.data[block.idstr].data)
    return digest.hexdigest()


def _content(
    image: RamImage, parent: str | None, pages: dict[str, Any], zeroed: dict[str, Any]
) -> LayerContent:
    return LayerContent(
        parent=parent,
        guest="bench",
        spec={"memory_mib": sum(b.length for b in image.blocks) >> 20},
        qemu_version="10.0.2",
        machine_type="pc-i440fx-10.0",
        mechanism="precopy-diff",
        ram_section=(2, 0, 4),
        stats={"synthetic": True},
        ram=image,
        pages=pages,
        zeroed=zeroed,
        prelude=b"QEVM\x00\x00\x00\x03" + b"p" * 64,
        epilogue=b"d" * (300 << 10),  # device state is ~0.3 MB on a real guest
    )


def build_chain(
    store: Store, flat: Store, memory: int, layers: int, fill: float, dirty: int, hot: int,
    seed: int, keep: set[int],
) -> tuple[list[str], dict[int, str], dict[int, int], dict[int, str]]:  # fmt: skip
    """Write the chain; returns its ids and, for the layer numbers in ``keep``, the digest
    and the number of non-zero pages of the image each was written from, and the id of the
    one-layer chain of that image in ``flat``."""
    rng = np.random.default_rng(seed)
    blocks = [RamBlock("pc.ram", memory), *(RamBlock(n, size) for n, size in SMALL_BLOCKS)]
    image = RamImage.zeroed(blocks)
    pages = image.pages_of("pc.ram")
    chosen = np.flatnonzero(rng.random(pages.shape[0]) < fill).astype(np.uint32)
    pages[chosen] = np.frombuffer(rng.bytes(chosen.size * PAGE_SIZE), np.uint8).reshape(
        -1, PAGE_SIZE
    )
    image.pages_of("pc.bios")[:] = 0x5A
    stored = {b.idstr: image.nonzero_pages(b.idstr) for b in blocks}
    ids: list[str] = []
    digests: dict[int, str] = {}
    nonzero: dict[int, int] = {}
    single: dict[int, str] = {}
    hot = min(hot, pages.shape[0])
    hot_start = pages.shape[0] // 4
    parent = None
    for number in range(1, layers + 1):
        if number > 1:
            rows = hot_start + rng.choice(hot, size=min(dirty, hot), replace=False)
            rows.sort()
            clear = rows[: max(1, rows.size // 50)]
            write = rows[clear.size :]
            pages[write] = np.frombuffer(rng.bytes(write.size * PAGE_SIZE), np.uint8).reshape(
                -1, PAGE_SIZE
            )
            pages[write, 0] |= 1  # never all zero
            was_nonzero = image.words_of("pc.ram")[clear].any(axis=1)
            pages[clear] = 0
            stored = {"pc.ram": write.astype(np.uint32)}
            zeroed = {"pc.ram": clear[was_nonzero].astype(np.uint32)}
        else:
            zeroed = {}
        manifest = store.write_layer(_content(image, parent, stored, zeroed))
        parent = manifest.id
        ids.append(manifest.id)
        if number in keep:
            digests[number] = image_digest(image)
            full = {b.idstr: image.nonzero_pages(b.idstr) for b in blocks}
            nonzero[number] = sum(p.size for p in full.values())
            single[number] = flat.write_layer(_content(image, None, full, {})).id
        if number % 100 == 0:
            print(f"  {number} layers written", file=sys.stderr, flush=True)
    return ids, digests, nonzero, single


def measure(store: Store, layer: str, repeat: int) -> tuple[list[float], str]:
    """Compose ``layer`` once untimed (caches, allocator), then ``repeat`` times timed."""
    runs = []
    digest = image_digest(load_layer_image(store, layer).ram)
    for _ in range(repeat):
        started = time.perf_counter()
        loaded = load_layer_image(store, layer)
        runs.append(time.perf_counter() - started)
        digest = image_digest(loaded.ram)
        del loaded
    return runs, digest


def format_table(rows: Sequence[Row], title: str) -> str:
    base = rows[0].median_s if rows else 0.0
    encrypted = any(row.encrypted_median_s is not None for row in rows)
    lines = [
        title,
        "",
        "| layer | chain length | non-zero pages | load_layer_image median (min) "
        "| same state as a one-layer chain | ratio | vs layer 1 |"
        + (" encrypted store | encrypted / clear |" if encrypted else ""),
        "|---|---|---|---|---|---|---|" + ("---|---|" if encrypted else ""),
    ]
    for row in rows:
        ratio = row.median_s / row.one_layer_median_s
        first = row.median_s / base if base else float("nan")
        line = (
            f"| {row.layer_number} | {row.chain} | {row.nonzero_pages} | "
            f"{row.median_s:.3f} s ({row.min_s:.3f} s) | {row.one_layer_median_s:.3f} s | "
            f"{ratio:.2f}x | {first:.2f}x |"
        )
        if row.encrypted_median_s is not None:
            line += (
                f" {row.encrypted_median_s:.3f} s | {row.encrypted_median_s / row.median_s:.2f}x |"
            )
        lines.append(line)
    return "\n".join(lines)


def measure_prune(store: Store, ids: list[str], keep: int, digest: str) -> dict[str, Any]:
    """Prune the chain to its ``keep`` newest layers (the oldest kept one absorbs the rest
    and becomes a base layer), then compose the newest layer again."""
    started = time.perf_counter()
    result = prune(store, KeepRules(last=keep))
    prune_s = time.perf_counter() - started
    runs, after = measure(store, ids[-1], 3)
    if after != digest:
        raise SystemExit("the newest layer composed to a different image after the prune")
    return {
        "keep": keep,
        "removed": len(result.removed),
        "rewritten": len(result.rewritten),
        "bytes_freed": result.bytes_freed,
        "prune_s": round(prune_s, 3),
        "compose_newest_after_s": round(statistics.median(runs), 4),
    }


# -- a real guest -------------------------------------------------------------------------


@dataclass
class RealRow:
    layer_number: int
    layer: str
    compose_s: float  # medians of restore_guest's phases
    load_s: float
    total_s: float
    runs: list[dict[str, float]]


def _wait_states(store: Store, count: int, timeout: float) -> str:
    serial = store.host.runtime_dir(GUEST) / "serial.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if text.count("STATE seq=") >= count:
            return text
        time.sleep(0.2)
    raise SystemExit(f"the guest printed fewer than {count} STATE lines in {timeout:.0f} s")


def real_chain(args: argparse.Namespace, at: list[int], scratch: Path) -> tuple[str, list[RealRow]]:
    """A real base layer of the test guest, then deltas that rewrite pages with the data they
    hold: every layer of the chain is the same guest state, so restoring layer N against
    layer 1 shows exactly what the chain's length costs."""
    store = Store.create(scratch / "real")
    spec = GuestSpec(
        memory_mib=parse_memory(args.memory),
        accel="tcg",
        media=(BootMedium.of("kernel", args.kernel), BootMedium.of("initrd", args.initrd)),
        append="console=ttyS0 quiet panic=-1 vmckpt.buf_mb=64 vmckpt.pages=4",
    )
    guest = LocalGuest.start(store, GUEST, spec)
    try:
        _wait_states(store, 5, 240)
        taken = take_checkpoint(guest)
    finally:
        guest.stop()
    base = taken.layer
    image, prelude, device = store.compose(base.id)
    rng = np.random.default_rng(args.seed)
    nonzero = image.nonzero_pages("pc.ram")
    hot = nonzero[nonzero.size // 4 :][: args.hot]
    ids = [base.id]
    started = time.monotonic()
    for _ in range(2, args.layers + 1):
        pages = np.sort(rng.choice(hot, size=min(args.dirty, hot.size), replace=False))
        content = LayerContent(
            parent=ids[-1], guest=GUEST, spec=base.spec, qemu_version=base.qemu_version,
            machine_type=base.machine_type, mechanism=base.mechanism,
            ram_section=base.ram_section, stats={"synthetic": "the base's own data"},
            ram=image, pages={"pc.ram": pages}, zeroed={}, prelude=prelude, epilogue=device,
        )  # fmt: skip
        ids.append(store.write_layer(content).id)
    built_s = time.monotonic() - started
    rows = []
    for number in at:
        runs = []
        for _ in range(args.repeat):
            restored = restore_guest(store, ids[number - 1], GUEST)
            try:
                before = _wait_states(store, 0, 1).count("STATE seq=")
                text = _wait_states(store, before + 3, 60)
                if "BAD" in text:
                    raise SystemExit(f"the guest restored from layer {number} reports BAD")
            finally:
                LocalGuest(store, GUEST).stop()
            runs.append(
                {"compose_s": restored.compose_s, "load_s": restored.load_s,
                 "total_s": restored.total_s}
            )  # fmt: skip
        compose_s, load_s, total_s = (
            statistics.median(r[k] for r in runs) for k in ("compose_s", "load_s", "total_s")
        )
        rows.append(RealRow(number, ids[number - 1], compose_s, load_s, total_s, runs))
    title = (
        f"vmckpt restore of layer N, real guest: the test guest ({args.memory}, TCG), one real "
        f"checkpoint as the base, {args.layers - 1} deltas of {args.dirty} of its pages with "
        f"the data they hold (every layer is the same state; chain written in {built_s:.0f} "
        f"s), {args.repeat} restores each; total includes the 1 s restore watches the guest"
    )
    return title, rows


def format_real(rows: Sequence[RealRow], title: str) -> str:
    first = rows[0].total_s if rows else 0.0
    lines = [
        title, "",
        "| layer | compose (resolve, verify, compose) | load into QEMU | total | vs layer 1 |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        lines.append(
            f"| {row.layer_number} | {row.compose_s:.3f} s | {row.load_s:.3f} s | "
            f"{row.total_s:.3f} s | {row.total_s / first:.2f}x |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="restore_chain",
        description="compose time of layers 1, 100, 1000 of one synthetic chain",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--memory", default="256M", help="guest RAM (the pc.ram block)")
    p.add_argument("--layers", type=int, default=1000, help="length of the chain")
    p.add_argument("--at", default="1,100,1000", help="layer numbers to restore (1 = base)")
    p.add_argument("--fill", type=float, default=0.4, help="share of non-zero base pages")
    p.add_argument("--dirty", type=int, default=160, help="pages each delta rewrites")
    p.add_argument("--hot", type=int, default=16384, help="pages the deltas are drawn from")
    p.add_argument("--repeat", type=int, default=5, help="compositions per layer")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--dir", type=Path, help="where to build the store (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the store afterwards")
    p.add_argument("--json", type=Path, metavar="FILE", help="write the rows as JSON")
    p.add_argument(
        "--encrypt", action="store_true",
        help="also write the chain into an encrypted store and compose it there",
    )  # fmt: skip
    p.add_argument(
        "--prune-keep", type=int, default=100, metavar="N",
        help="then prune the chain to its N newest layers, and time it (0: no prune)",
    )  # fmt: skip
    p.add_argument(
        "--real", action="store_true",
        help="instead: a real base layer of the test guest and full restores into QEMU",
    )  # fmt: skip
    p.add_argument("--kernel", type=Path, default=REPO_GUEST / "vmlinuz")
    p.add_argument("--initrd", type=Path, default=REPO_GUEST / "initrd.img")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    at = sorted({int(x) for x in args.at.split(",") if x.strip()})
    if not at or at[0] < 1 or at[-1] > args.layers:
        print(f"--at must name layers between 1 and {args.layers}", file=sys.stderr)
        return 2
    memory = parse_memory(args.memory) << 20
    scratch = Path(tempfile.mkdtemp(prefix="vmckpt-chain-", dir=args.dir))
    try:
        if args.real:
            title, real = real_chain(args, at, scratch)
            print(format_real(real, title))
            if args.json:
                out = {"title": title, "rows": [asdict(r) for r in real]}
                args.json.write_text(json.dumps(out, indent=2) + "\n")
            return 0
        store = Store.create(scratch / "store")
        flat = Store.create(scratch / "one-layer")
        started = time.monotonic()
        ids, digests, nonzero, single = build_chain(
            store, flat, memory, args.layers, args.fill, args.dirty, args.hot, args.seed,
            {*at, args.layers},
        )  # fmt: skip
        built_s = time.monotonic() - started
        size = sum(p.stat().st_size for p in store.path.rglob("*") if p.is_file())
        sealed: Store | None = None
        sealed_ids: list[str] = []
        if args.encrypt:  # the very same chain (same seed), encrypted
            sealed = Store.create(scratch / "encrypted", encrypt=True)
            sealed_ids, *_ = build_chain(
                sealed, Store.create(scratch / "encrypted-one-layer", encrypt=True), memory,
                args.layers, args.fill, args.dirty, args.hot, args.seed, set(),
            )  # fmt: skip
        rows = []
        for number in at:
            runs, digest = measure(store, ids[number - 1], args.repeat)
            flat_runs, flat_digest = measure(flat, single[number], args.repeat)
            if digest != digests[number] or flat_digest != digests[number]:
                raise SystemExit(f"layer {number} composed to a different image")
            row = Row(number, ids[number - 1], number, nonzero[number],
                      statistics.median(runs), min(runs), [round(r, 4) for r in runs],
                      statistics.median(flat_runs), [round(r, 4) for r in flat_runs])  # fmt: skip
            if sealed is not None:
                sealed_runs, sealed_digest = measure(sealed, sealed_ids[number - 1], args.repeat)
                if sealed_digest != digests[number]:
                    raise SystemExit(f"layer {number} composed to a different image, encrypted")
                row.encrypted_median_s = statistics.median(sealed_runs)
                row.encrypted_runs = [round(r, 4) for r in sealed_runs]
            rows.append(row)
        title = (
            f"restore from layer N of one chain: {args.memory} guest (synthetic: random data in "
            f"{args.fill:.0%} of its pages, deltas of {args.dirty} pages from a hot region of "
            f"{args.hot}), {args.layers} layers ({size / 2**20:.0f} MiB, written in "
            f"{built_s:.0f} s), {args.repeat} runs each, warm page cache"
            + (", and the same chain in an encrypted store" if sealed is not None else "")
        )
        print(format_table(rows, title))
        pruned = None
        if 0 < args.prune_keep < args.layers:
            pruned = measure_prune(store, ids, args.prune_keep, digests[args.layers])
            print(
                f"\nprune --keep-last {pruned['keep']}: {pruned['removed']} layers removed, "
                f"{pruned['rewritten']} rewritten (the oldest kept one absorbs the rest), "
                f"{pruned['bytes_freed'] / 2**20:.0f} MiB freed in {pruned['prune_s']:.2f} s; "
                f"layer {args.layers} then composes in {pruned['compose_newest_after_s']:.3f} s"
            )
        if args.json:
            data: dict[str, Any] = {
                "title": title, "rows": [asdict(r) for r in rows], "prune": pruned,
            }  # fmt: skip
            args.json.write_text(json.dumps(data, indent=2) + "\n")
        if args.keep:
            print(f"store kept at {scratch}")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
