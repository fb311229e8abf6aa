"""What decoding QEMU's migration stream costs vmckpt, without QEMU's timing around it.

Two measurements, each through the package's public API only (so the same script
measures two versions of vmckpt.stream against each other):

- ``--stream FILE``: :func:`vmckpt.stream.read_stream` over a recorded migration
  stream (a file, read from the page cache): what a precopy-diff checkpoint's receiver
  does with QEMU's stream. Wall and CPU time per read, and MB/s.
- ``--colo-pages N,...``: the COLO receiver against a scripted primary on a socket
  pair: an opening migration, then ``--checkpoints`` checkpoints of N pages each
  (page numbers drawn at random and sent in order, as QEMU walks its dirty bitmap;
  1 in 50 a ZERO page, 1 in 20 in a second RAM block). Each checkpoint is in the
  socket before the receiver starts on it (the primary's send buffer is made large
  enough, as root), so what is timed is the receiver alone: ``receive_checkpoint``
  (inside the guest's pause: reply, read, framing checked) and
  ``ReceivedCheckpoint.checkpoint`` (after the acknowledgement: the pages copied out).

``--record FILE`` first makes a stream to read: the test guest booted in QEMU
(``--memory``, its workload writing ``--rate`` pages per step) and live-migrated into
the file once it runs.

    python3 -m benchmarks.stream --record /tmp/live512.stream --memory 512
    python3 -m benchmarks.stream --stream /tmp/live512.stream --repeat 9
    python3 -m benchmarks.stream --colo-pages 600,1100 --checkpoints 300

Benchmarks print numbers; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmckpt.machine.binary import qemu_binary
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage
from vmckpt.stream import StreamEnvelope, read_stream, write_stream
from vmckpt.stream import format as fmt
from vmckpt.stream.colo import ColoReceiver

REPO_GUEST = Path(__file__).resolve().parent.parent / "guest" / "build"
SECTION_ID = 2
BLOCKS = [RamBlock("pc.ram", 256 << 20), RamBlock("vga.vram", 16 << 20)]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


# -- reading a recorded stream -------------------------------------------------------


def bench_read(path: Path, repeat: int) -> dict[str, Any]:
    size = path.stat().st_size
    walls: list[float] = []
    cpus: list[float] = []
    pages = 0
    for _ in range(repeat):
        with path.open("rb") as source:
            wall, cpu = time.perf_counter(), time.process_time()
            _, image = read_stream(source)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
        pages = sum(len(image.nonzero_pages(block.idstr)) for block in image.blocks)
        del image
    wall = statistics.median(walls)
    print(
        f"read_stream {path} ({size / 1e6:.1f} MB, {pages} non-zero pages), {repeat} reads: "
        f"wall median {_ms(wall)} ms (min {_ms(min(walls))}), "
        f"CPU median {_ms(statistics.median(cpus))} ms (min {_ms(min(cpus))}), "
        f"{size / 1e6 / wall:.0f} MB/s"
    )
    return {"bytes": size, "wall_s": walls, "cpu_s": cpus}


# -- the COLO receiver against a scripted primary ---------------------------------------


def _be32(value: int) -> bytes:
    return fmt.BE32.pack(value)


def _opening() -> bytes:
    """An opening migration as QEMU sends it, RAM all zero (ZERO records), one device."""
    machine = b"pc-i440fx-11.1"
    prelude = (
        _be32(fmt.QEMU_VM_FILE_MAGIC) + _be32(fmt.QEMU_VM_FILE_VERSION)
        + bytes([fmt.CONFIGURATION]) + _be32(len(machine)) + machine
    )  # fmt: skip
    vmdesc = json.dumps({"page_size": PAGE_SIZE, "devices": []}).encode()
    epilogue = (
        bytes([fmt.SECTION_FULL]) + _be32(3) + bytes([5]) + b"timer" + _be32(0) + _be32(2)
        + b"state" + bytes([fmt.SECTION_FOOTER]) + _be32(3) + bytes([fmt.SECTION_EOF])
        + bytes([fmt.VMDESCRIPTION]) + _be32(len(vmdesc)) + vmdesc
    )  # fmt: skip
    envelope = StreamEnvelope(prelude, machine.decode(), SECTION_ID, 0, 4, epilogue)
    sink = io.BytesIO()
    write_stream(sink, envelope, RamImage.zeroed(BLOCKS))
    return sink.getvalue()


def _checkpoint(rng: np.random.Generator, count: int, previous_block: str) -> tuple[bytes, str]:
    """What QEMU sends after the CHECKPOINT_REPLY: VMSTATE_SEND, the ram END section with
    ``count`` page records, EOF, VMSTATE_SIZE and ~300 KB of device state."""
    out = bytearray(_be32(fmt.COLO_VMSTATE_SEND))
    out += bytes([fmt.SECTION_END]) + _be32(SECTION_ID)
    data = rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()
    second = max(1, count // 20)
    plan = [
        ("pc.ram", np.sort(rng.choice(BLOCKS[0].length // PAGE_SIZE, count - second, False))),
        ("vga.vram", np.sort(rng.choice(BLOCKS[1].length // PAGE_SIZE, second, False))),
    ]
    block = previous_block
    for name, numbers in plan:
        for number in numbers.tolist():
            zero = rng.random() < 0.02
            flags = fmt.RAM_FLAG_ZERO if zero else fmt.RAM_FLAG_PAGE
            if name == block:
                out += struct.pack(">Q", number * PAGE_SIZE | flags | fmt.RAM_FLAG_CONTINUE)
            else:
                out += struct.pack(">Q", number * PAGE_SIZE | flags)
                out += bytes([len(name)]) + name.encode()
                block = name
            out += b"\0" if zero else data
    out += struct.pack(">Q", fmt.RAM_FLAG_EOS) + bytes([fmt.SECTION_FOOTER]) + _be32(SECTION_ID)
    out += bytes([fmt.SECTION_EOF])
    device = bytes(300_000)
    out += _be32(fmt.COLO_VMSTATE_SIZE) + struct.pack(">Q", len(device)) + device
    return bytes(out), block


def _send(primary: socket.socket, payload: bytes) -> threading.Thread | None:
    """Send at once if the socket takes it all (the receiver then runs alone), else from a
    thread while the receiver reads."""
    with contextlib.suppress(OSError):
        primary.setsockopt(socket.SOL_SOCKET, 32, 4 * len(payload))  # SO_SNDBUFFORCE
    if primary.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= 2 * len(payload):
        primary.sendall(payload)
        return None
    thread = threading.Thread(target=primary.sendall, args=(payload,), daemon=True)
    thread.start()
    return thread


def bench_colo(pages: int, checkpoints: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    ours, primary = socket.socketpair()
    receiver = ColoReceiver(ours)
    opening = _send(primary, _opening())
    receiver.read_initial()
    if opening is not None:
        opening.join()
    primary.setblocking(False)
    receive: list[float] = []
    receive_cpu: list[float] = []
    copy: list[float] = []
    concurrent = False
    block = BLOCKS[-1].idstr  # the opening's last record was of the last block
    try:
        for _ in range(checkpoints + 3):  # the first 3 warm up
            payload, block = _checkpoint(rng, pages, block)
            primary.sendall(_be32(fmt.COLO_CHECKPOINT_REQUEST))
            receiver.wait_request()
            # (QEMU sends the rest once it has the reply; here it is sent before, so that
            # the receiver is timed alone.)
            sender = _send(primary, payload)
            concurrent |= sender is not None
            wall, cpu = time.perf_counter(), time.thread_time()
            received = receiver.receive_checkpoint()
            took, took_cpu = time.perf_counter() - wall, time.thread_time() - cpu
            receiver.acknowledge()
            wall = time.perf_counter()
            taken = received.checkpoint()
            copied = time.perf_counter() - wall
            if sender is not None:
                sender.join()
            with contextlib.suppress(BlockingIOError):
                while primary.recv(1 << 16):
                    pass
            assert taken.pages.pages + sum(z.size for z in taken.pages.zeroed.values()) > 0
            receive.append(took)
            receive_cpu.append(took_cpu)
            copy.append(copied)
    finally:
        receiver.close()
        primary.close()
    receive, receive_cpu, copy = receive[3:], receive_cpu[3:], copy[3:]
    median = statistics.median(receive)
    print(
        f"COLO checkpoint of {pages} pages, {checkpoints} checkpoints"
        f"{' (sent while received)' if concurrent else ''}: receive_checkpoint median "
        f"{median * 1e6:.0f} us (min {min(receive) * 1e6:.0f}, p90 "
        f"{np.percentile(receive, 90) * 1e6:.0f}; CPU median "
        f"{statistics.median(receive_cpu) * 1e6:.0f}), {median * 1e6 / pages:.2f} us/page; "
        f"checkpoint() median {statistics.median(copy) * 1e6:.0f} us"
    )
    return {"pages": pages, "receive_s": receive, "receive_cpu_s": receive_cpu, "copy_s": copy}


# -- recording a stream ----------------------------------------------------------------


def _migration_status(qmp: QEMUMonitorProtocol) -> str:
    return str(cast(dict[str, Any], qmp.cmd("query-migrate")).get("status"))


def record(path: Path, memory_mib: int, rate: int) -> None:
    """Boot the test guest, wait for its workload, live-migrate it into ``path``."""
    with tempfile.TemporaryDirectory(prefix="vk-stream-") as work:
        qmp_path, serial = Path(work) / "qmp", Path(work) / "serial.log"
        command = [
            qemu_binary(), "-accel", "tcg", "-m", str(memory_mib), "-display", "none",
            "-kernel", str(REPO_GUEST / "vmlinuz"), "-initrd", str(REPO_GUEST / "initrd.img"),
            "-append", f"console=ttyS0 quiet panic=-1 vmckpt.buf_mb=64 vmckpt.pages={rate}",
            "-serial", f"file:{serial}", "-qmp", f"unix:{qmp_path},server=on,wait=off",
        ]  # fmt: skip
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 120
            while not (serial.exists() and serial.read_bytes().count(b"STATE seq=") >= 5):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the test guest did not run its workload")
                time.sleep(0.2)
            qmp = QEMUMonitorProtocol(str(qmp_path))
            qmp.connect()
            qmp.cmd("migrate", uri=f"exec:cat > {path}")
            while (status := _migration_status(qmp)) not in ("completed", "failed"):
                time.sleep(0.1)
            qmp.close()
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"recorded {path}: migration {status}, {path.stat().st_size / 1e6:.1f} MB")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python3 -m benchmarks.stream", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )  # fmt: skip
    p.add_argument("--record", type=Path, metavar="FILE", help="record a stream first")
    p.add_argument("--memory", type=int, default=512, help="MiB of the guest --record boots")
    p.add_argument("--rate", type=int, default=100, help="pages its workload writes per step")
    p.add_argument("--stream", type=Path, metavar="FILE", help="time read_stream on this stream")
    p.add_argument("--repeat", type=int, default=7, help="reads of --stream")
    p.add_argument("--colo-pages", default="", help="pages per COLO checkpoint, e.g. 600,1100")
    p.add_argument("--checkpoints", type=int, default=200, help="COLO checkpoints per size")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", type=Path, metavar="FILE", help="dump every raw measurement")
    args = p.parse_args(argv)
    out: dict[str, Any] = {}
    if args.record:
        record(args.record, args.memory, args.rate)
    if args.stream:
        out["read"] = bench_read(args.stream, args.repeat)
    for pages in [int(n) for n in args.colo_pages.split(",") if n.strip()]:
        out[f"colo-{pages}"] = bench_colo(pages, args.checkpoints, args.seed)
    if args.json:
        args.json.write_text(json.dumps(out))
    if not out and not args.record:
        p.print_usage(sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
