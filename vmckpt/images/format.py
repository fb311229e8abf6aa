"""The on-disk format of a layer: its constants, its manifest and its page index.

Everything here is pure (bytes and values in, values out); `store` does the
file work. docs/FORMAT.md is the specification this module implements.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmckpt.errors import CorruptLayerError, FormatVersionError
from vmckpt.fsutil import parse_json
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, PageNumbers, PageSet, RamImage, SpilledPages

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    import numpy.typing as npt

# The newest version this vmckpt reads (and writes: see LAYER_MINOR). Readers accept the
# same major and a lower or equal minor (see `check_version`); the version is the format's
# own, not vmckpt's.
FORMAT_MAJOR = 1
FORMAT_MINOR = 6  # 1.1 disks, 1.2 digests, 1.3 seals, 1.4 encryption, 1.5 catalog, 1.6 removed
DISKS_MINOR = 1  # the optional manifest field `disks`, disk-<id>.idx/.bin
SUMS_MINOR = 2  # pages.sum, required from 1.2 on
SEAL_MINOR = 3  # manifest.mac and the marker's store_id, from 1.3 on
# 1.4: the marker's `encryption` (an encrypted store's marker is 1.4, so a reader of 1.3 or
# older refuses the store rather than read its files as if they were in the clear). Layers
# are the same in an encrypted store (their manifests list the content's sizes and digests),
# so every layer is still written as 1.3 and reads the same anywhere.
ENCRYPTION_MINOR = 4
# 1.5: the store's sealed catalog (catalog.json: its layers and heads); a store with one has
# a marker of 1.5, so a reader of 1.4 or older, which would ignore it, refuses the store.
CATALOG_MINOR = 5
# 1.6: a catalog that records removed layers (a store in a bucket; images/catalog.py). The
# marker and the layers are unchanged.
REMOVED_MINOR = 6
LAYER_MINOR = SEAL_MINOR  # what a layer's manifest is written as

LAYER_FORMAT = "vmckpt-layer"
STORE_FORMAT = "vmckpt-store"

MANIFEST = "manifest.json"
PAGES = "pages.bin"
INDEX = "pages.idx"
PRELUDE = "prelude.bin"
DEVICE = "device.bin"
# The files every 1.x layer has besides its manifest.
LAYER_FILES = (PAGES, INDEX, PRELUDE, DEVICE)
# 1.2: for each page of pages.bin, in the same order, the first PAGE_DIGEST_SIZE bytes of
# its SHA-256, so a reader can check the pages it reads without hashing the whole file.
SUMS = "pages.sum"
PAGE_DIGEST_SIZE = 16
# 1.1: per writable disk <id>, its delta's extent index and data.
DISK_INDEX = "disk-{}.idx"
DISK_DATA = "disk-{}.bin"
DISK_DTYPE = "<u8"  # dtypes as strings: numpy loads on first use (vmckpt/lazy_numpy.py)
DISK_WORD = 8  # its size
DISK_ALIGN = 512  # extents start and end on sector boundaries
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z")

INDEX_DTYPE = "<u4"
INDEX_WORD = 4  # its size
LAYER_ID_RE = re.compile(r"^(\d{4,})-([0-9a-f]{6})\Z")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
_FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")


@dataclass(frozen=True)
class FileEntry:
    """Size and sha256 (lowercase hex) of one file of a layer."""

    size: int
    sha256: str


@dataclass(frozen=True)
class BlockSummary:
    """One RAM block of a layer: its layout and how many pages the layer records."""

    idstr: str
    length: int
    pages_stored: int
    pages_zeroed: int

    @property
    def pages(self) -> int:
        return (self.length + PAGE_SIZE - 1) // PAGE_SIZE


Extents = tuple[tuple[int, int], ...]  # (offset, length) in bytes, ascending, disjoint


@dataclass(frozen=True)
class DiskRecord:
    """One writable disk of a layer (format 1.1): what the layer's delta of it covers.

    The delta is relative to the disk's contents at the parent layer, or to an
    all-zero disk when ``full``. ``bitmap`` names the QEMU dirty bitmap that
    tracked, in the guest that wrote the layer, the writes since this layer.
    """

    id: str
    format: str  # the guest's image format: raw or qcow2
    size: int  # virtual size in bytes
    path: str  # the image the guest used (informational)
    full: bool
    extents_stored: int
    extents_zeroed: int
    bytes_stored: int
    bytes_zeroed: int
    bitmap: str | None

    @property
    def index_file(self) -> str:
        return DISK_INDEX.format(self.id)

    @property
    def data_file(self) -> str:
        return DISK_DATA.format(self.id)


@dataclass(frozen=True)
class DiskDelta:
    """A disk delta handed to `Store.write_layer`: its extents and a scratch file with the
    data of the stored extents, concatenated in order (copied into the layer)."""

    id: str
    format: str
    size: int
    path: str
    full: bool
    stored: Extents
    zeroed: Extents
    data_path: Path
    bitmap: str | None


@dataclass(frozen=True)
class DiskIndex:
    stored: Extents
    zeroed: Extents


@dataclass(frozen=True)
class LayerManifest:
    """Everything a layer says about itself; the parsed, validated manifest.json."""

    id: str
    parent: str | None
    created: str  # ISO 8601 UTC, e.g. 2025-01-31T12:00:00.123456Z
    guest: str
    spec: dict[str, Any]
    qemu_version: str
    machine_type: str
    mechanism: str
    ram_section: tuple[int, int, int]  # (section id, instance id, version id)
    blocks: tuple[BlockSummary, ...]
    stats: dict[str, Any]
    files: dict[str, FileEntry]
    format_version: tuple[int, int]
    disks: tuple[DiskRecord, ...] = ()  # format 1.1; none in 1.0
    # Where the layer comes from, as its seal (manifest.mac) says; not part of manifest.json
    # (see images/keys.py). Set by Store when it reads the layer.
    origin: str = field(default="", compare=False)

    def disk(self, disk_id: str) -> DiskRecord | None:
        return next((d for d in self.disks if d.id == disk_id), None)

    @property
    def is_base(self) -> bool:
        return self.parent is None

    @property
    def bytes_total(self) -> int:
        """Sum of the sizes of the layer's files (manifest.json not included)."""
        return sum(entry.size for entry in self.files.values())

    @property
    def layout(self) -> list[tuple[str, int]]:
        """The RAM block layout (idstr, length) in manifest order."""
        return [(block.idstr, block.length) for block in self.blocks]

    @property
    def pages_stored(self) -> int:
        return sum(block.pages_stored for block in self.blocks)

    @property
    def has_page_sums(self) -> bool:
        """Whether pages.sum holds a digest per stored page (format 1.2 on)."""
        return self.format_version >= (1, SUMS_MINOR)


@dataclass
class LayerContent:
    """What the checkpoint code hands to `Store.write_layer`."""

    parent: str | None
    guest: str
    spec: dict[str, Any]
    qemu_version: str
    machine_type: str
    mechanism: str
    ram_section: tuple[int, int, int]
    stats: dict[str, Any]
    # The guest's RAM at this checkpoint: the full image (precopy-diff), or only the pages
    # the checkpoint delivered (COLO), which must then hold every page of ``pages``.
    ram: RamImage | PageSet | SpilledPages
    pages: dict[str, npt.NDArray[Any]]  # per block: page numbers whose data this layer stores
    zeroed: dict[str, npt.NDArray[Any]]  # per block: pages that became all-zero since the parent
    prelude: bytes  # QEMU stream header and configuration section, opaque
    epilogue: bytes  # device state, opaque
    disks: list[DiskDelta] = field(default_factory=list)  # writable disks (format 1.1)


@dataclass(frozen=True)
class BlockIndex:
    """The decoded index of one block: sorted, disjoint page numbers."""

    stored: PageNumbers
    zeroed: PageNumbers


def is_layer_file_name(name: str) -> bool:
    """A name a layer's file may have (manifest.json included): no paths, no dot files."""
    return bool(_FILE_NAME_RE.match(name)) and len(name) <= 64


# --- manifest -------------------------------------------------------------


def canonical_json(obj: Any) -> bytes:
    """The canonical encoding the manifest checksum is computed over."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def manifest_checksum(obj: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a manifest object without its checksum field."""
    body = {key: value for key, value in obj.items() if key != "manifest_sha256"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def manifest_to_json(manifest: LayerManifest) -> dict[str, Any]:
    """The JSON object of a manifest, checksum included."""
    obj: dict[str, Any] = {
        "format": LAYER_FORMAT,
        "format_version": list(manifest.format_version),
        "id": manifest.id,
        "parent": manifest.parent,
        "created": manifest.created,
        "guest": manifest.guest,
        "spec": manifest.spec,
        "qemu_version": manifest.qemu_version,
        "machine_type": manifest.machine_type,
        "mechanism": manifest.mechanism,
        "ram_section": list(manifest.ram_section),
        "blocks": [
            {
                "idstr": block.idstr,
                "length": block.length,
                "pages_stored": block.pages_stored,
                "pages_zeroed": block.pages_zeroed,
            }
            for block in manifest.blocks
        ],
        "stats": manifest.stats,
        "files": {
            name: {"size": entry.size, "sha256": entry.sha256}
            for name, entry in sorted(manifest.files.items())
        },
    }
    if manifest.format_version >= (1, DISKS_MINOR):
        obj["disks"] = [
            {
                "id": d.id,
                "format": d.format,
                "size": d.size,
                "path": d.path,
                "full": d.full,
                "extents_stored": d.extents_stored,
                "extents_zeroed": d.extents_zeroed,
                "bytes_stored": d.bytes_stored,
                "bytes_zeroed": d.bytes_zeroed,
                "bitmap": d.bitmap,
            }
            for d in manifest.disks
        ]
    obj["manifest_sha256"] = manifest_checksum(obj)
    return obj


def manifest_bytes(obj: dict[str, Any]) -> bytes:
    """manifest.json as written: sorted keys, indented for people, ASCII, newline."""
    text = json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=True, allow_nan=False)
    return (text + "\n").encode("ascii")


def _version_text(version: tuple[int, int]) -> str:
    return f"{version[0]}.{version[1]}"


def check_version(
    version: tuple[int, int], *, what: str, layer: str | None, step: str, note: str = ""
) -> None:
    """Accept the same major and a lower or equal minor; raise FormatVersionError otherwise."""
    major, minor = version
    ours = f"{FORMAT_MAJOR}.0" + (f" to {FORMAT_MAJOR}.{FORMAT_MINOR}" if FORMAT_MINOR else "")
    if major > FORMAT_MAJOR or (major == FORMAT_MAJOR and minor > FORMAT_MINOR):
        raise FormatVersionError(
            f"{what}: format version {_version_text(version)} is newer than this vmckpt "
            f"reads ({ours}){note}",
            layer=layer,
            step=step,
        )
    if major != FORMAT_MAJOR:
        raise FormatVersionError(
            f"{what}: format version {_version_text(version)} is older than this vmckpt "
            f"reads ({ours}){note}",
            layer=layer,
            step=step,
        )


def parse_version(value: Any, *, what: str, layer: str | None, step: str) -> tuple[int, int]:
    if (
        not isinstance(value, list)
        or len(value) != 2
        or not all(type(part) is int and part >= 0 for part in value)
    ):
        raise CorruptLayerError(
            f"{what}: format_version is {value!r}, not [major, minor]", layer=layer, step=step
        )
    return (value[0], value[1])


class _Fields:
    """Typed access to a JSON object's fields, each failure a CorruptLayerError."""

    def __init__(self, obj: dict[str, Any], where: str, layer: str, step: str) -> None:
        self.obj = obj
        self.where = where
        self.layer = layer
        self.step = step

    def fail(self, message: str) -> CorruptLayerError:
        return CorruptLayerError(f"{MANIFEST}: {message}", layer=self.layer, step=self.step)

    def get(self, key: str) -> Any:
        if key not in self.obj:
            raise self.fail(f"{self.where}field {key!r} is missing")
        return self.obj[key]

    def get_str(self, key: str) -> str:
        value = self.get(key)
        if not isinstance(value, str):
            raise self.fail(f"{self.where}field {key!r} is {value!r}, not a string")
        return value

    def get_int(self, key: str) -> int:
        value = self.get(key)
        if type(value) is not int or value < 0:
            raise self.fail(f"{self.where}field {key!r} is {value!r}, not a count")
        return value

    def get_dict(self, key: str) -> dict[str, Any]:
        value = self.get(key)
        if not isinstance(value, dict):
            raise self.fail(f"{self.where}field {key!r} is not an object")
        return value

    def get_list(self, key: str) -> list[Any]:
        value = self.get(key)
        if not isinstance(value, list):
            raise self.fail(f"{self.where}field {key!r} is not a list")
        return value


def parse_manifest(data: bytes, layer_id: str, step: str) -> LayerManifest:
    """Parse and validate manifest.json: format, version, checksum, fields.

    The version is judged before the checksum, because a newer format may
    compute its checksum differently; a mismatching checksum is then only
    mentioned. Raises CorruptLayerError or FormatVersionError.
    """

    def corrupt(message: str) -> CorruptLayerError:
        return CorruptLayerError(f"{MANIFEST}: {message}", layer=layer_id, step=step)

    try:
        obj = parse_json(data)
    except (UnicodeDecodeError, ValueError) as exc:
        raise corrupt(f"not valid JSON ({exc})") from exc
    if not isinstance(obj, dict):
        raise corrupt("not a JSON object")
    if obj.get("format") != LAYER_FORMAT:
        raise corrupt(f"format is {obj.get('format')!r}, not {LAYER_FORMAT!r}")
    version = parse_version(obj.get("format_version"), what=MANIFEST, layer=layer_id, step=step)
    stored_sum = obj.get("manifest_sha256")
    try:
        checksum_ok = stored_sum == manifest_checksum(obj)
    except ValueError:  # NaN or infinity somewhere: never written by us
        checksum_ok = False
    check_version(
        version,
        what=MANIFEST,
        layer=layer_id,
        step=step,
        note="" if checksum_ok else "; its checksum does not match either, it may be damaged",
    )
    if not isinstance(stored_sum, str):
        raise corrupt("manifest_sha256 is missing")
    if not checksum_ok:
        raise corrupt(
            f"sha256 mismatch (manifest_sha256 says {stored_sum}, "
            f"content hashes to {manifest_checksum(obj)})"
        )

    fields = _Fields(obj, "", layer_id, step)
    manifest_id = fields.get_str("id")
    parent = fields.get("parent")
    if parent is not None and (not isinstance(parent, str) or not LAYER_ID_RE.match(parent)):
        raise corrupt(f"parent is {parent!r}, not a layer id")
    ram_section = fields.get_list("ram_section")
    if len(ram_section) != 3 or not all(type(part) is int for part in ram_section):
        raise corrupt(f"ram_section is {ram_section!r}, not [section, instance, version]")

    blocks: list[BlockSummary] = []
    seen: set[str] = set()
    for number, raw in enumerate(fields.get_list("blocks")):
        if not isinstance(raw, dict):
            raise corrupt(f"blocks[{number}] is not an object")
        block_fields = _Fields(raw, f"blocks[{number}]: ", layer_id, step)
        block = BlockSummary(
            idstr=block_fields.get_str("idstr"),
            length=block_fields.get_int("length"),
            pages_stored=block_fields.get_int("pages_stored"),
            pages_zeroed=block_fields.get_int("pages_zeroed"),
        )
        if block.idstr in seen:
            raise corrupt(f"RAM block {block.idstr!r} is listed twice")
        if block.pages_stored + block.pages_zeroed > block.pages:
            raise corrupt(
                f"RAM block {block.idstr!r} has {block.pages} pages but records "
                f"{block.pages_stored} stored and {block.pages_zeroed} zeroed"
            )
        seen.add(block.idstr)
        blocks.append(block)

    files: dict[str, FileEntry] = {}
    for name, raw in fields.get_dict("files").items():
        if not _FILE_NAME_RE.match(name) or name == MANIFEST:
            raise corrupt(f"file name {name!r} is not allowed")
        if not isinstance(raw, dict):
            raise corrupt(f"files[{name!r}] is not an object")
        file_fields = _Fields(raw, f"files[{name!r}]: ", layer_id, step)
        digest = file_fields.get_str("sha256")
        if not _SHA256_RE.match(digest):
            raise corrupt(f"files[{name!r}]: sha256 {digest!r} is not 64 lowercase hex digits")
        files[name] = FileEntry(size=file_fields.get_int("size"), sha256=digest)
    for name in LAYER_FILES:
        if name not in files:
            raise corrupt(f"does not list {name}")
    if version >= (1, SUMS_MINOR):
        if SUMS not in files:
            raise corrupt(f"does not list {SUMS}")
        stored = sum(block.pages_stored for block in blocks)
        if files[SUMS].size != PAGE_DIGEST_SIZE * stored:
            raise corrupt(
                f"{SUMS} is listed with {files[SUMS].size} bytes, the blocks store {stored} "
                f"pages ({PAGE_DIGEST_SIZE * stored} bytes of digests)"
            )
    disks = _parse_disks(obj, version, files, layer_id, step)

    return LayerManifest(
        id=manifest_id,
        parent=parent,
        created=fields.get_str("created"),
        guest=fields.get_str("guest"),
        spec=fields.get_dict("spec"),
        qemu_version=fields.get_str("qemu_version"),
        machine_type=fields.get_str("machine_type"),
        mechanism=fields.get_str("mechanism"),
        ram_section=(ram_section[0], ram_section[1], ram_section[2]),
        blocks=tuple(blocks),
        stats=fields.get_dict("stats"),
        files=files,
        format_version=version,
        disks=disks,
    )


def _parse_disks(
    obj: dict[str, Any],
    version: tuple[int, int],
    files: dict[str, FileEntry],
    layer_id: str,
    step: str,
) -> tuple[DiskRecord, ...]:
    """The 1.1 ``disks`` list (absent, and so empty, in 1.0 layers)."""

    def corrupt(message: str) -> CorruptLayerError:
        return CorruptLayerError(f"{MANIFEST}: {message}", layer=layer_id, step=step)

    if version < (1, DISKS_MINOR):
        return ()
    disks: list[DiskRecord] = []
    if "disks" not in obj:  # optional: absent means no writable disks
        return ()
    for number, raw in enumerate(_Fields(obj, "", layer_id, step).get_list("disks")):
        if not isinstance(raw, dict):
            raise corrupt(f"disks[{number}] is not an object")
        f = _Fields(raw, f"disks[{number}]: ", layer_id, step)
        full = f.get("full")
        bitmap = f.get("bitmap")
        if not isinstance(full, bool) or not (bitmap is None or isinstance(bitmap, str)):
            raise corrupt(f"disks[{number}]: full or bitmap has the wrong type")
        record = DiskRecord(
            id=f.get_str("id"),
            format=f.get_str("format"),
            size=f.get_int("size"),
            path=f.get_str("path"),
            full=full,
            extents_stored=f.get_int("extents_stored"),
            extents_zeroed=f.get_int("extents_zeroed"),
            bytes_stored=f.get_int("bytes_stored"),
            bytes_zeroed=f.get_int("bytes_zeroed"),
            bitmap=bitmap,
        )
        if not DISK_ID_RE.match(record.id) or any(d.id == record.id for d in disks):
            raise corrupt(f"disk id {record.id!r} is not allowed or repeats")
        for name in (record.index_file, record.data_file):
            if name not in files:
                raise corrupt(f"does not list {name}")
        if files[record.data_file].size != record.bytes_stored:
            raise corrupt(
                f"{record.data_file} is listed with {files[record.data_file].size} bytes, "
                f"disk {record.id} stores {record.bytes_stored}"
            )
        disks.append(record)
    return tuple(disks)


# --- disk extent index (1.1) ------------------------------------------------


def encode_disk_index(stored: Extents, zeroed: Extents) -> bytes:
    """disk-<id>.idx: u64 count_stored, u64 count_zeroed, then (offset, length) pairs."""
    words = [len(stored), len(zeroed)]
    for offset, length in (*stored, *zeroed):
        words += [offset, length]
    return np.array(words, dtype=DISK_DTYPE).tobytes()


def check_extents(stored: Extents, zeroed: Extents, size: int) -> str | None:
    """Why the extents are not valid for a disk of ``size`` bytes, or None if they are."""
    for what, extents in (("stored", stored), ("zeroed", zeroed)):
        end = 0
        for offset, length in extents:
            if offset % DISK_ALIGN or length % DISK_ALIGN or length <= 0:
                return f"{what} extent ({offset}, {length}) is not sector aligned"
            if offset < end:
                return f"{what} extents are not ascending and disjoint at offset {offset}"
            end = offset + length
            if end > size:
                return f"{what} extent ({offset}, {length}) ends after the disk ({size} bytes)"
    ends = sorted([*stored, *zeroed])
    for (a_off, a_len), (b_off, _) in itertools.pairwise(ends):
        if a_off + a_len > b_off:
            return f"stored and zeroed extents overlap at offset {b_off}"
    return None


def decode_disk_index(data: bytes, record: DiskRecord, layer_id: str, step: str) -> DiskIndex:
    """Decode a disk index and check it against its manifest record."""

    def corrupt(message: str) -> CorruptLayerError:
        return CorruptLayerError(f"{record.index_file}: {message}", layer=layer_id, step=step)

    if len(data) % DISK_WORD or len(data) < 2 * DISK_WORD:
        raise corrupt(f"{len(data)} bytes is not a valid extent index (truncated?)")
    words = [int(w) for w in np.frombuffer(data, dtype=DISK_DTYPE)]
    count_stored, count_zeroed = words[0], words[1]
    if (count_stored, count_zeroed) != (record.extents_stored, record.extents_zeroed):
        raise corrupt(
            f"has {count_stored} stored and {count_zeroed} zeroed extents, manifest says "
            f"{record.extents_stored} and {record.extents_zeroed}"
        )
    if len(words) != 2 + 2 * (count_stored + count_zeroed):
        raise corrupt(f"{len(data)} bytes do not match its extent counts")
    pairs = [(words[i], words[i + 1]) for i in range(2, len(words), 2)]
    stored, zeroed = tuple(pairs[:count_stored]), tuple(pairs[count_stored:])
    problem = check_extents(stored, zeroed, record.size)
    if problem:
        raise corrupt(problem)
    if sum(length for _, length in stored) != record.bytes_stored:
        raise corrupt(f"stored extents do not add up to {record.bytes_stored} bytes")
    if sum(length for _, length in zeroed) != record.bytes_zeroed:
        raise corrupt(f"zeroed extents do not add up to {record.bytes_zeroed} bytes")
    return DiskIndex(stored, zeroed)


# --- page digests (1.2) ------------------------------------------------------


def _digest_threads() -> int:
    """Threads that hash pages. hashlib lets go of the GIL for each page's hash only, so
    threads that hash take it back 256 times per MiB: on 2 CPUs two threads hashed at 0.7 times
    the speed of one (750 vs 1,140 MB/s, measured here); on 4 CPUs and more, half of them."""
    cpus = len(os.sched_getaffinity(0))
    return min(4, cpus // 2) if cpus >= 4 else 1


_DIGEST_THREADS = _digest_threads()
_DIGEST_SPLIT = 2048  # pages: below this, one thread is as fast
_digest_pool: ThreadPoolExecutor | None = None


def _digest_range(data: memoryview, start: int, end: int) -> bytes:
    sha256 = hashlib.sha256
    return b"".join(
        [
            sha256(data[offset : offset + PAGE_SIZE]).digest()[:PAGE_DIGEST_SIZE]
            for offset in range(start * PAGE_SIZE, end * PAGE_SIZE, PAGE_SIZE)
        ]
    )


def page_digests(pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The pages.sum rows of ``pages`` (n, 4096): the first 16 bytes of each page's SHA-256.

    hashlib releases the GIL while it hashes a page, so on a host with CPUs to spare many
    pages are hashed by a few threads at once (:func:`_digest_threads`).
    """
    global _digest_pool
    count = pages.shape[0]
    data = np.ascontiguousarray(pages).data.cast("B")
    if count < _DIGEST_SPLIT or _DIGEST_THREADS == 1:
        joined = _digest_range(data, 0, count)
    else:
        if _digest_pool is None:
            # Imported here: a page server's first answer (one page) must not wait for it.
            from concurrent.futures import ThreadPoolExecutor

            _digest_pool = ThreadPoolExecutor(_DIGEST_THREADS, thread_name_prefix="vmckpt-sum")
        bounds = [count * i // _DIGEST_THREADS for i in range(_DIGEST_THREADS + 1)]
        parts = [
            _digest_pool.submit(_digest_range, data, a, b) for a, b in itertools.pairwise(bounds)
        ]
        joined = b"".join(part.result() for part in parts)
    return np.frombuffer(joined, dtype=np.uint8).reshape(-1, PAGE_DIGEST_SIZE)


def decode_sums(data: bytes, manifest: LayerManifest, step: str) -> npt.NDArray[np.uint8]:
    """pages.sum as (pages stored, 16) rows; its size was checked against the manifest."""
    if len(data) != PAGE_DIGEST_SIZE * manifest.pages_stored:
        raise CorruptLayerError(
            f"{SUMS}: {len(data)} bytes, not {PAGE_DIGEST_SIZE} per stored page",
            layer=manifest.id,
            step=step,
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(-1, PAGE_DIGEST_SIZE)


# --- page index -----------------------------------------------------------


def encode_index(parts: list[BlockIndex]) -> bytes:
    """pages.idx: per block u32 count_stored, u32 count_zeroed, the stored, the zeroed."""
    arrays: list[npt.NDArray[Any]] = []
    for part in parts:
        arrays.append(np.array([part.stored.size, part.zeroed.size], dtype=INDEX_DTYPE))
        arrays.append(part.stored.astype(INDEX_DTYPE, copy=False))
        arrays.append(part.zeroed.astype(INDEX_DTYPE, copy=False))
    if not arrays:
        return b""
    return np.concatenate(arrays).tobytes()


def _check_pages(
    numbers: PageNumbers, block: BlockSummary, what: str, layer_id: str, step: str
) -> None:
    if numbers.size == 0:
        return
    if numbers.size > 1 and not bool(np.all(numbers[1:] > numbers[:-1])):
        raise CorruptLayerError(
            f"{INDEX}: {what} page numbers of RAM block {block.idstr!r} are not strictly ascending",
            layer=layer_id,
            step=step,
        )
    if int(numbers[-1]) >= block.pages:
        raise CorruptLayerError(
            f"{INDEX}: {what} page {int(numbers[-1])} is outside RAM block {block.idstr!r} "
            f"({block.pages} pages)",
            layer=layer_id,
            step=step,
        )


def decode_index(data: bytes, manifest: LayerManifest, step: str) -> list[BlockIndex]:
    """Decode pages.idx and check it against the manifest (counts, ranges, order)."""
    layer_id = manifest.id

    def corrupt(message: str) -> CorruptLayerError:
        return CorruptLayerError(f"{INDEX}: {message}", layer=layer_id, step=step)

    if len(data) % INDEX_WORD:
        raise corrupt(f"{len(data)} bytes is not a whole number of u32 words")
    words: PageNumbers = np.frombuffer(data, dtype=INDEX_DTYPE).astype(np.uint32)
    pos = 0
    parts: list[BlockIndex] = []
    for block in manifest.blocks:
        if pos + 2 > words.size:
            raise corrupt(f"ends before RAM block {block.idstr!r} (truncated?)")
        count_stored, count_zeroed = int(words[pos]), int(words[pos + 1])
        if (count_stored, count_zeroed) != (block.pages_stored, block.pages_zeroed):
            raise corrupt(
                f"RAM block {block.idstr!r} has {count_stored} stored and {count_zeroed} zeroed "
                f"pages, manifest says {block.pages_stored} and {block.pages_zeroed}"
            )
        pos += 2
        end = pos + count_stored + count_zeroed
        if end > words.size:
            raise corrupt(f"ends inside RAM block {block.idstr!r} (truncated?)")
        stored = words[pos : pos + count_stored]
        zeroed = words[pos + count_stored : end]
        pos = end
        _check_pages(stored, block, "stored", layer_id, step)
        _check_pages(zeroed, block, "zeroed", layer_id, step)
        both = (
            np.intersect1d(stored, zeroed, assume_unique=True)
            if stored.size and zeroed.size
            else stored[:0]
        )
        if both.size:
            raise corrupt(
                f"page {int(both[0])} of RAM block {block.idstr!r} is both stored and zeroed"
            )
        parts.append(BlockIndex(stored=stored, zeroed=zeroed))
    if pos != words.size:
        raise corrupt(f"{(words.size - pos) * INDEX_WORD} bytes after the last block")
    return parts
