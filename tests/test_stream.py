"""vmckpt.stream against real QEMU: parse live streams, load rewritten ones, reject bad input.

The guest is a 128 MiB PC with no disk: a 4 MiB random blob loaded at
0x1000000 (never touched by the guest) and a tiny multiboot kernel that
increments a counter at COUNTER_ADDR forever and writes it into one page of a
4 MiB buffer after another, so a live migration has to send pages again.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.framework.bareqemu import BareQemu
from tests.framework.guest import wait_for
from vmckpt.errors import StreamError
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage
from vmckpt.stream import StreamEnvelope, read_stream, write_stream

MEMORY = 128 << 20
BLOB_ADDR = 0x1000000
BLOB_SIZE = 4 << 20
COUNTER_ADDR = 0x1F00000
LOW = 1 << 20  # below 1 MiB, guest-physical addresses are not plain pc.ram

pytestmark = pytest.mark.qemu

# 32-bit code, entered by QEMU's multiboot loader with paging off:
#   mov ebx, COUNTER_ADDR
# 1: inc dword [ebx]; mov eax, [ebx]; and eax, 0x3ff; shl eax, 12
#   mov ecx, [ebx]; mov [eax + 0x2000000], ecx; jmp 1b
_KERNEL_CODE = bytes.fromhex("BB0000F001FF038B0325FF030000C1E00C8B0B898800000002EBEA")


def _multiboot_kernel() -> bytes:
    load = 0x100000
    magic, flags = 0x1BADB002, 0x00010000  # a.out kludge: load address fields valid
    header = struct.pack(
        "<8I", magic, flags, -(magic + flags) & 0xFFFFFFFF, load, load, 0, 0, load + 32
    )
    return header + _KERNEL_CODE


def counter(qemu: BareQemu) -> int:
    """The guest's counter (its kernel increments it forever once it runs)."""
    return int(qemu.hmp(f"xp /1wx {COUNTER_ADDR:#x}").split()[-1], 16)


def counting(qemu: BareQemu, above: int = 0) -> int:
    """Wait until the guest's counter is above ``above`` (its kernel runs); the counter."""
    return wait_for(
        lambda: value if (value := counter(qemu)) > above else None,
        f"the guest in QEMU {qemu.name} counting past {above}",
        30,
        evidence=qemu.log_tail,
    )


def _guest_args(workdir: Path) -> list[str]:
    return [
        "-accel", "tcg", "-m", str(MEMORY >> 20), "-display", "none", "-nodefaults",
        "-kernel", str(workdir / "kernel.bin"),
        "-device", f"loader,file={workdir / 'blob.bin'},addr={BLOB_ADDR:#x}",
    ]  # fmt: skip


class LiveStream:
    """A stream from a live migration of the running guest, and what the source held."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.blob = np.random.default_rng(1234).bytes(BLOB_SIZE)
        (workdir / "blob.bin").write_bytes(self.blob)
        (workdir / "kernel.bin").write_bytes(_multiboot_kernel())
        self.path = workdir / "live.stream"
        with BareQemu(workdir, "source", _guest_args(workdir)) as source:
            counting(source)  # the guest runs, writing pages the migration must send again
            # Slow enough for several PART iterations, fast enough to converge.
            source.execute("migrate-set-parameters", **{"max-bandwidth": 40_000_000})
            source.execute("migrate", uri=f"exec:cat > {self.path}")
            self.info = source.wait_migration()
            # The source is now paused exactly at the state the stream ends with.
            self.source_ram = source.memory(LOW, MEMORY - LOW, workdir / "source.mem")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> LiveStream:
    return LiveStream(tmp_path_factory.mktemp("stream"))


@pytest.fixture(scope="module")
def parsed(live: LiveStream) -> tuple[StreamEnvelope, RamImage]:
    with live.path.open("rb") as source:
        return read_stream(source)


def test_a_qemu_that_does_not_come_up_is_reported_with_its_output(tmp_path: Path) -> None:
    """The framework's launcher, given a command line QEMU refuses."""
    with pytest.raises(AssertionError, match=r"QEMU broken did not come up \(exit code 1\)") as e:
        BareQemu(tmp_path, "broken", ["-machine", "no-such-machine", "-display", "none"])
    assert "no-such-machine" in str(e.value)  # QEMU's own words, from its log
    assert not (tmp_path / "broken.qmp").exists()


# -- parsing real streams --------------------------------------------------------------------


def test_live_stream_pages_equal_source_memory(
    live: LiveStream, parsed: tuple[StreamEnvelope, RamImage]
) -> None:
    envelope, image = parsed
    assert envelope.machine_type.startswith("pc-i440fx-")
    assert envelope.prelude.startswith(b"QEVM\x00\x00\x00\x03\x07")
    assert envelope.ram_version_id == 4
    assert envelope.epilogue.rstrip(b"\x00").endswith(b"}")  # the vmdesc JSON
    assert image.block("pc.ram").length == MEMORY
    assert {"pc.bios", "pc.rom"} <= {block.idstr for block in image.blocks}
    ram = image.data["pc.ram"]
    assert ram[BLOB_ADDR : BLOB_ADDR + BLOB_SIZE].tobytes() == live.blob
    assert ram[LOW:].tobytes() == live.source_ram
    counter = int(ram[COUNTER_ADDR : COUNTER_ADDR + 4].view("<u4")[0])
    assert counter > 0
    # The guest kept writing: QEMU sent more pages than the image holds non-zero.
    assert live.info["ram"]["normal"] > sum(len(image.nonzero_pages(b.idstr)) for b in image.blocks)


def test_on_blocks_allocates_the_image(live: LiveStream) -> None:
    seen: list[list[RamBlock]] = []

    def allocate(blocks: list[RamBlock]) -> RamImage:
        seen.append(blocks)
        return RamImage.zeroed(blocks)

    with live.path.open("rb") as source:
        _, image = read_stream(source, on_blocks=allocate)
    assert seen == [image.blocks]


def test_reads_from_an_unbuffered_source(
    live: LiveStream, parsed: tuple[StreamEnvelope, RamImage]
) -> None:
    with live.path.open("rb", buffering=0) as source:
        envelope, image = read_stream(source)
    assert envelope == parsed[0]
    assert image.data["pc.ram"].tobytes() == parsed[1].data["pc.ram"].tobytes()


def test_reads_a_live_migration_from_a_socket(live: LiveStream) -> None:
    """The way vmckpt receives a checkpoint: QEMU migrates into a socket we read."""
    listen_path = live.workdir / "migrate.sock"
    result: dict[str, tuple[StreamEnvelope, RamImage] | BaseException] = {}
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(listen_path))
        server.listen(1)
        server.settimeout(30)

        def receive() -> None:
            try:
                conn, _ = server.accept()
                with conn, conn.makefile("rb") as stream:
                    result["stream"] = read_stream(stream)
            except BaseException as exc:  # handed to the test thread
                result["stream"] = exc

        receiver = threading.Thread(target=receive)
        receiver.start()
        try:
            with BareQemu(live.workdir, "socket-source", _guest_args(live.workdir)) as source:
                counting(source)
                source.execute("migrate", uri=f"unix:{listen_path}")
                receiver.join(timeout=60)
                source.wait_migration()
                source_ram = source.memory(LOW, MEMORY - LOW, live.workdir / "socket-source.mem")
        finally:
            receiver.join(timeout=30)
    outcome = result["stream"]
    if isinstance(outcome, BaseException):
        raise outcome
    envelope, image = outcome
    assert envelope.machine_type.startswith("pc-i440fx-")
    assert image.data["pc.ram"][LOW:].tobytes() == source_ram


# -- writing: QEMU loads the rewritten stream -----------------------------------------------


def test_round_trip_qemu_loads_written_stream(
    live: LiveStream, parsed: tuple[StreamEnvelope, RamImage]
) -> None:
    envelope, image = parsed
    written = live.workdir / "written.stream"
    with written.open("wb") as sink:
        size = write_stream(sink, envelope, image)
    assert size == written.stat().st_size

    with written.open("rb") as source:
        again_envelope, again = read_stream(source)
    assert again_envelope == envelope
    for block in image.blocks:
        assert np.array_equal(again.data[block.idstr], image.data[block.idstr])

    args = [*_guest_args(live.workdir), "-S", "-incoming", "defer"]
    with BareQemu(live.workdir, "dest", args) as dest:
        dest.execute("migrate-incoming", uri=f"exec:cat {written}")
        dest.wait_migration()
        assert not dest.monitor.is_running()
        dest_ram = dest.memory(LOW, MEMORY - LOW, live.workdir / "dest.mem")
        assert dest_ram == image.data["pc.ram"][LOW:].tobytes()
        before = counter(dest)
        assert before == int(image.data["pc.ram"][COUNTER_ADDR : COUNTER_ADDR + 4].view("<u4")[0])
        dest.execute("cont")
        assert dest.monitor.is_running()
        counting(dest, above=before)  # the guest continues from the stored state


def test_written_stream_restores_zero_pages(parsed: tuple[StreamEnvelope, RamImage]) -> None:
    """A page that is zero in the image is written as ZERO and reads back as zeros."""
    envelope, image = parsed
    changed = RamImage(image.blocks, {k: v.copy() for k, v in image.data.items()})
    changed.pages_of("pc.ram")[BLOB_ADDR // PAGE_SIZE] = 0
    changed.pages_of("pc.ram")[5] = 0x5A
    sink = io.BytesIO()
    write_stream(sink, envelope, changed)
    sink.seek(0)
    target = RamImage.zeroed(image.blocks)
    target.data["pc.ram"][:] = 0xFF  # ZERO records must clear, not skip

    _, back = read_stream(sink, on_blocks=lambda blocks: target)
    for block in image.blocks:
        assert np.array_equal(back.data[block.idstr], changed.data[block.idstr])


# -- bad input ---------------------------------------------------------------------------------


def _read_bytes(data: bytes) -> tuple[StreamEnvelope, RamImage]:
    return read_stream(io.BytesIO(data))


def _layout(live: LiveStream, parsed: tuple[StreamEnvelope, RamImage]) -> dict[str, int]:
    """Byte offsets of landmarks in the live stream, derived from its envelope."""
    envelope, image = parsed
    size = live.path.stat().st_size
    start = len(envelope.prelude)
    mem_size = start + 1 + 4 + 1 + 3 + 4 + 4
    blocks_end = mem_size + 8 + sum(1 + len(b.idstr) + 8 for b in image.blocks)
    footer = blocks_end + 8  # after EOS
    kept = 5  # the SWITCHOVER_START command QEMU 10 sends before the ram END
    epilogue = size - (len(envelope.epilogue) - kept)
    return {
        "size": size,
        "start": start,
        "mem_size": mem_size,
        "footer": footer,
        "part": footer + 5,
        "first_page": footer + 5 + 5,
        "epilogue": epilogue,
    }


def test_bad_magic(live: LiveStream) -> None:
    data = b"QEVX" + live.path.read_bytes()[4:]
    with pytest.raises(StreamError, match=r"magic 0x51455658 at byte offset 0"):
        _read_bytes(data)


@pytest.mark.parametrize("version", [2, 4])
def test_wrong_version(live: LiveStream, version: int) -> None:
    data = bytearray(live.path.read_bytes())
    data[4:8] = struct.pack(">I", version)
    with pytest.raises(StreamError, match=rf"unsupported migration stream version {version}"):
        _read_bytes(bytes(data))


def test_truncated_everywhere(live: LiveStream, parsed: tuple[StreamEnvelope, RamImage]) -> None:
    data = live.path.read_bytes()
    at = _layout(live, parsed)
    cuts = [
        0, 3, 6, 12, at["start"] + 3, at["mem_size"] + 4, at["mem_size"] + 20,
        at["footer"] + 2, at["part"] + 2, at["first_page"] + 100,
        at["size"] // 2, at["epilogue"] - 3, at["epilogue"], at["epilogue"] + 10,
        at["epilogue"] + 1000, at["size"] - 1000, at["size"] - 1,
    ]  # fmt: skip
    for cut in cuts:
        with pytest.raises(StreamError, match="truncated") as error:
            _read_bytes(data[:cut])
        assert "byte offset" in str(error.value), cut


def test_wrong_footer(live: LiveStream, parsed: tuple[StreamEnvelope, RamImage]) -> None:
    data = bytearray(live.path.read_bytes())
    footer = _layout(live, parsed)["footer"]
    assert data[footer] == 0x7E
    bad_id = bytearray(data)
    bad_id[footer + 1 : footer + 5] = struct.pack(">I", 99)
    with pytest.raises(StreamError, match=rf"footer at byte offset {footer} names section id 99"):
        _read_bytes(bytes(bad_id))
    bad_byte = bytearray(data)
    bad_byte[footer] = 0x7F
    with pytest.raises(StreamError, match=r"expected section footer \(0x7e\) at byte offset"):
        _read_bytes(bytes(bad_byte))


@pytest.mark.parametrize(
    ("flag", "name"),
    [(0x40, "XBZRLE"), (0x100, "COMPRESS_PAGE"), (0x80, "HOOK"), (0x400, "0x400"), (0x1, "FULL")],
)
def test_unsupported_flag(
    live: LiveStream, parsed: tuple[StreamEnvelope, RamImage], flag: int, name: str
) -> None:
    data = bytearray(live.path.read_bytes())
    first = _layout(live, parsed)["first_page"]
    word = struct.unpack_from(">Q", data, first)[0]
    assert word & 0xFFF in (0x08, 0x02)  # a PAGE or ZERO record opens the first PART
    struct.pack_into(">Q", data, first, (word & ~0xFFF) | flag)
    with pytest.raises(StreamError, match=rf"unsupported RAM record flags {name}.* offset {first}"):
        _read_bytes(bytes(data))


# -- bad input built by hand -------------------------------------------------------------------

_HEADER = b"QEVM" + struct.pack(">I", 3)


def _config(machine: bytes = b"pc-i440fx-10.0", subsections: bytes = b"") -> bytes:
    return b"\x07" + struct.pack(">I", len(machine)) + machine + subsections


def _start(idstr: bytes, section_id: int = 2) -> bytes:
    return b"\x01" + struct.pack(">IB", section_id, len(idstr)) + idstr + struct.pack(">II", 0, 4)


def _word(value: int) -> bytes:
    return struct.pack(">Q", value)


def _mem_size(pages: int) -> bytes:
    return _word(pages * PAGE_SIZE | 0x04) + b"\x06pc.ram" + _word(pages * PAGE_SIZE)


_EOS_FOOTER = _word(0x10) + b"\x7e" + struct.pack(">I", 2)
_TAIL = b"\x03" + struct.pack(">I", 2) + _EOS_FOOTER + b"\x7e" + struct.pack(">I", 7) + b"\x00"


def test_later_copies_overwrite_earlier() -> None:
    page = bytes(range(256)) * 16
    stream = (
        _HEADER
        + _config()
        + _start(b"ram")
        + _mem_size(4)
        + _word(0x08)
        + b"\x06pc.ram"
        + page
        + _word(PAGE_SIZE | 0x28)
        + page
        + _EOS_FOOTER
        + b"\x02"
        + struct.pack(">I", 2)
        + _word(0x22)  # page 0 zeroed by a later ZERO record
        + b"\x00"
        + _word(PAGE_SIZE | 0x28)
        + b"\xaa" * PAGE_SIZE
        + _word(0x200)  # MULTIFD_FLUSH: ignored
        + _EOS_FOOTER
        + b"\x08\x00\x0b\x00\x00"  # SWITCHOVER_START
        + _TAIL
    )
    envelope, image = _read_bytes(stream)
    assert envelope.machine_type == "pc-i440fx-10.0"
    assert envelope.prelude == _HEADER + _config()
    assert envelope.epilogue == b"\x08\x00\x0b\x00\x00\x7e" + struct.pack(">I", 7) + b"\x00"
    assert (envelope.ram_section_id, envelope.ram_instance_id) == (2, 0)
    pages = image.pages_of("pc.ram")
    assert not pages[0].any()
    assert pages[1].tobytes() == b"\xaa" * PAGE_SIZE
    assert not pages[2:].any()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_start(b"block") + _word(0x10), r"unsupported iterative section 'block' \(section id 2\)"),
        (_start(b"dirty-bitmap"), r"unsupported iterative section 'dirty-bitmap'"),
        (b"\x08\x00\x03\x00\x00", r"unsupported command 3 \(POSTCOPY_ADVISE\) at byte offset 27"),
        (b"\x04" + struct.pack(">IB", 3, 5) + b"timer", r"device section 'timer' \(section id 3\)"),
        (b"\x00", r"unexpected section type 0x00 \(EOF\) at byte offset 27 before the RAM section"),
        (
            _start(b"ram") + _mem_size(2) + _word(0x02) + b"\x06pc.ram" + b"\x01",
            r"ZERO page with fill byte 0x01 at byte offset 67 \(RAM block 'pc.ram', offset 0x0\)",
        ),
        (
            _start(b"ram") + _mem_size(2) + _word(2 * PAGE_SIZE | 0x02) + b"\x06pc.ram\x00",
            r"page offset 0x2000 beyond RAM block 'pc.ram'",
        ),
        (_start(b"ram") + _mem_size(2) + _word(0x22) + b"\x00", r"CONTINUE but no previous block"),
        (_start(b"ram") + _word(0x02) + b"\x06pc.ram\x00", r"unknown RAM block 'pc.ram'.*MEM_SIZE"),
        (_start(b"ram") + _word(0x10) + b"\x7e" + struct.pack(">I", 2), r"has no MEM_SIZE"),
        (
            _start(b"ram") + _word(2 * PAGE_SIZE | 0x04) + b"\x06pc.ram" + _word(3 * PAGE_SIZE),
            r"RAM block 'pc.ram' of 12288 bytes exceeds the 8192 bytes left",
        ),
        (
            _start(b"ram")
            + _mem_size(2)
            + _EOS_FOOTER
            + b"\x04"
            + struct.pack(">IB", 3, 5)
            + b"timer",
            r"device section .* before the RAM section ended",
        ),
        (
            _start(b"ram") + _mem_size(2) + _EOS_FOOTER + b"\x02" + struct.pack(">I", 5),
            r"PART of section id 5 at byte offset 80",
        ),
        (
            _start(b"ram")
            + _mem_size(2)
            + _EOS_FOOTER
            + b"\x03"
            + struct.pack(">I", 2)
            + b"\0" * 3,
            r"stream truncated at byte offset 88 inside RAM section END",
        ),
        (_start(b"ram") + _mem_size(2) + _EOS_FOOTER + _TAIL[:-1], r"does not end with the EOF"),
    ],
)
def test_rejects_malformed(body: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message) as error:
        _read_bytes(_HEADER + _config() + body)
    assert error.value.step == "reading migration stream"


@pytest.mark.parametrize(
    ("subsection", "message"),
    [
        (b"\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0fx-ignore-shared",
         r"capability x-ignore-shared"),
        (b"\x1econfiguration/target-page-bits\x00\x00\x00\x01\x00\x00\x00\x0d",
         r"target page bits 13"),
        (b"\x13configuration/bogus\x00\x00\x00\x01", r"unknown configuration subsection"),
    ],
)  # fmt: skip
def test_rejects_configuration(subsection: bytes, message: str) -> None:
    with pytest.raises(StreamError, match=message):
        _read_bytes(_HEADER + _config(subsections=b"\x05" + subsection) + _start(b"ram"))


def test_accepts_supported_configuration() -> None:
    caps = b"\x1aconfiguration/capabilities\x00\x00\x00\x01\x00\x00\x00\x01\x0aother-caps"
    uuid = b"\x12configuration/uuid\x00\x00\x00\x01" + bytes(range(16))
    prelude = _HEADER + _config(subsections=b"\x05" + caps + b"\x05" + uuid)
    stream = prelude + _start(b"ram") + _mem_size(1) + _EOS_FOOTER + _TAIL
    envelope, image = _read_bytes(stream)
    assert envelope.prelude == prelude
    assert image.blocks == [RamBlock("pc.ram", PAGE_SIZE)]


def test_writer_rejects_image_without_data(parsed: tuple[StreamEnvelope, RamImage]) -> None:
    envelope, image = parsed
    broken = RamImage(image.blocks, {k: v for k, v in image.data.items() if k != "pc.bios"})
    with pytest.raises(StreamError, match=r"block 'pc\.bios'"):
        write_stream(io.BytesIO(), envelope, broken)
