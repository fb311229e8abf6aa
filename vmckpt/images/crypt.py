"""How a layer file is held on disk: in the clear, or (an encrypted store) sealed record by
record with ChaCha20-Poly1305. docs/FORMAT.md, *Encryption at rest*, is the specification.

A store's files are read and written only through the two pairs here, so the store code
does not care which it has:

- :class:`PlainFile` / :class:`PlainWriter`: the bytes are the content (every store before
  format 1.4, and every store made without ``--encrypt``: exactly as before);
- :class:`SealedFile` / :class:`SealedWriter`: a 32-byte header (magic, version, algorithm,
  record size, a random 16-byte salt), then the content in records of ``RECORD_SIZE``
  bytes (the last one shorter, or empty for an empty file), each encrypted and
  authenticated with its own 16-byte tag under a key of that file alone (HKDF of the
  store's data key with the salt), the nonce its record number, the associated data the
  store id, the layer id, the file name, the record number and whether it is the last.

A :class:`Codec` says which: :data:`PLAIN`, or a :class:`SealedCodec` made from the store's
key. Sizes and SHA-256 digests in a manifest are always those of the content (the
plaintext); the on-disk size of a sealed file is a function of that (:meth:`Codec.disk_size`).

Every reader reports a problem as a one-line CorruptLayerError naming the layer, the file
and the step: a short file, a bad header, a record that does not authenticate. Nothing it
returns has not authenticated.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from vmckpt.errors import CorruptLayerError
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, first_of_runs, read_in_runs

if TYPE_CHECKING:
    import numpy.typing as npt
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

ALGORITHM = "chacha20-poly1305"  # the store marker's "encryption"
MAGIC = b"VMCKENC\0"
VERSION = 1
ALGORITHM_ID = 1  # ChaCha20-Poly1305 (RFC 8439)
HEADER = struct.Struct("<8sHHI16s")  # magic, version, algorithm, record size, salt
HEADER_SIZE = HEADER.size  # 32
SALT_SIZE = 16
RECORD_SIZE = 256 << 10  # plaintext bytes per record: 64 pages
TAG_SIZE = 16
RECORD_DISK = RECORD_SIZE + TAG_SIZE
RECORD_PAGES = RECORD_SIZE // PAGE_SIZE
DATA_KEY_INFO = b"vmckpt data encryption v1"  # HKDF info: the store key -> the data key
FILE_KEY_INFO = b"vmckpt file key v1"  # HKDF info: the data key + a file's salt -> its key
AD_CONTEXT = b"vmckpt record v1\0"
GROUP_RECORDS = 16  # records read per system call (4 MiB)
PLAIN_CHUNK = 1 << 20


def records_of(size: int) -> int:
    """Records a sealed file of ``size`` content bytes has (an empty one has one, empty)."""
    return max(1, -(-size // RECORD_SIZE))


def sealed_size(size: int) -> int:
    """The on-disk size of a sealed file holding ``size`` bytes."""
    return HEADER_SIZE + size + TAG_SIZE * records_of(size)


def _hkdf(key: bytes, salt: bytes | None, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def _aead(key: bytes) -> ChaCha20Poly1305:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    return ChaCha20Poly1305(key)


def _nonce(record: int) -> bytes:
    return struct.pack("<Q", record) + bytes(4)


def _ad_prefix(store_id: str, layer_id: str, name: str) -> bytes:
    return AD_CONTEXT + b"\0".join([store_id.encode(), layer_id.encode(), name.encode(), b""])


def _byte_view(buf: Any) -> memoryview:
    view = memoryview(buf)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


# --- readers ------------------------------------------------------------------------------


class LayerFile:
    """A listed file of a layer, open to read its content (``size`` bytes); close it (or use
    it as a context manager). Every error is a CorruptLayerError naming layer, file, step."""

    def __init__(self, fd: int, size: int, layer: str, name: str, step: str) -> None:
        self.fd = fd
        self.size = size
        self.layer = layer
        self.name = name
        self.step = step

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> LayerFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def corrupt(self, message: str) -> CorruptLayerError:
        return CorruptLayerError(message, layer=self.layer, step=self.step)

    def truncated(self) -> CorruptLayerError:
        return self.corrupt(f"{self.name} ended early (truncated?)")

    def _pread_raw(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` from the file at ``offset`` (on disk); a short file is truncated."""
        done = 0
        while done < view.nbytes:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if not got:
                raise self.truncated()
            done += got

    def pread_into(self, buf: Any, offset: int) -> None:
        """Fill ``buf`` (a writable buffer) with the content at ``offset``."""
        raise NotImplementedError

    def pread(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        self.pread_into(out, offset)
        return bytes(out)

    def chunks(self) -> Iterator[bytes]:
        """The whole content, in order, a chunk at a time."""
        raise NotImplementedError

    def read_all(self) -> bytes:
        return b"".join(self.chunks())

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for chunk in self.chunks():
            digest.update(chunk)
        return digest.hexdigest()

    def read_pages(self, positions: npt.NDArray[np.int64], out: npt.NDArray[np.uint8]) -> None:
        """Pages ``positions`` (ascending page numbers of the file: pages.bin) into the rows
        of ``out`` (len(positions), PAGE_SIZE)."""
        raise NotImplementedError


class PlainFile(LayerFile):
    """A file whose bytes are its content."""

    def pread_into(self, buf: Any, offset: int) -> None:
        self._pread_raw(_byte_view(buf), offset)

    def chunks(self) -> Iterator[bytes]:
        offset = 0
        while offset < self.size:
            chunk = os.pread(self.fd, min(PLAIN_CHUNK, self.size - offset), offset)
            if not chunk:
                raise self.truncated()
            offset += len(chunk)
            yield chunk

    def read_all(self) -> bytes:
        # Up to one byte more than listed: a file that grew since it was opened fails its
        # sha256 (the caller checks it).
        # One read where the kernel gives it all (a regular file does): no join to copy
        # (15 ms of the 30 MB of an 8 GiB guest's pages.sum).
        chunks: list[bytes] = []
        offset, limit = 0, self.size + 1
        while limit > 0 and (chunk := os.pread(self.fd, limit, offset)):
            chunks.append(chunk)
            offset += len(chunk)
            limit -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_pages(self, positions: npt.NDArray[np.int64], out: npt.NDArray[np.uint8]) -> None:
        """One read per run of positions, across small gaps (ram.read_in_runs)."""
        read_in_runs(positions, out, self.pread_into)


class SealedFile(LayerFile):
    """A file of an encrypted store: header, then authenticated records (module doc)."""

    def __init__(
        self, fd: int, size: int, layer: str, name: str, step: str, codec: SealedCodec
    ) -> None:
        super().__init__(fd, size, layer, name, step)
        self.records = records_of(size)
        header = bytearray(HEADER_SIZE)
        self._pread_raw(memoryview(header), 0)
        magic, version, algorithm, record_size, salt = HEADER.unpack(header)
        if (magic, version, algorithm, record_size) != (
            MAGIC, VERSION, ALGORITHM_ID, RECORD_SIZE,
        ):  # fmt: skip
            raise self.corrupt(
                f"{name}: its header is not that of an encrypted layer file (format 1.4, "
                f"{ALGORITHM}, records of {RECORD_SIZE} bytes)"
            )
        self._aead = codec.file_cipher(salt)
        self._ad = _ad_prefix(codec.store_id, layer, name)
        self._cipher = bytearray(0)  # ciphertext read, reused
        self._cached = -1  # the record whose content is in self._record
        self._record = bytearray(0)

    def _plain_len(self, record: int) -> int:
        return min(RECORD_SIZE, self.size - record * RECORD_SIZE)

    def _read_cipher(self, first: int, count: int) -> memoryview:
        """The on-disk bytes of records first .. first+count-1, in one read."""
        start = HEADER_SIZE + first * RECORD_DISK
        last = first + count - 1
        length = (count - 1) * RECORD_DISK + self._plain_len(last) + TAG_SIZE
        if len(self._cipher) < length:
            self._cipher = bytearray(length)
        view = memoryview(self._cipher)[:length]
        self._pread_raw(view, start)
        return view

    def _open(self, record: int, cipher: memoryview, out: memoryview | None = None) -> bytes:
        """Decrypt and authenticate one record (its bytes on disk) into ``out``, or (None)
        as new bytes."""
        from cryptography.exceptions import InvalidTag

        last = b"\1" if record == self.records - 1 else b"\0"
        ad = self._ad + struct.pack("<Q", record) + last
        try:
            if out is None:
                return self._aead.decrypt(_nonce(record), cipher, ad)
            self._aead.decrypt_into(_nonce(record), cipher, ad, out)
            return b""
        except InvalidTag:
            raise self.corrupt(
                f"{self.name}: record {record} does not authenticate (damaged, moved from "
                "another file, layer or store, or encrypted with another key)"
            ) from None

    def _records(self, first: int, count: int) -> Iterator[tuple[int, memoryview]]:
        """Each record of first .. first+count-1 with its on-disk bytes, read a group at a
        time."""
        for start in range(first, first + count, GROUP_RECORDS):
            group = min(GROUP_RECORDS, first + count - start)
            cipher = self._read_cipher(start, group)
            for record in range(start, start + group):
                at = (record - start) * RECORD_DISK
                yield record, cipher[at : at + self._plain_len(record) + TAG_SIZE]

    def pread_into(self, buf: Any, offset: int) -> None:
        view = _byte_view(buf)
        end = offset + view.nbytes
        if offset < 0 or end > self.size:
            raise self.truncated()
        if not view.nbytes:
            return
        first, last = offset // RECORD_SIZE, (end - 1) // RECORD_SIZE
        for record, cipher in self._records(first, last - first + 1):
            start = record * RECORD_SIZE
            stop = start + self._plain_len(record)
            lo, hi = max(offset, start), min(end, stop)
            if (lo, hi) == (start, stop):  # a whole record: straight into place
                self._open(record, cipher, view[lo - offset : hi - offset])
                continue
            if self._cached != record:  # part of one: kept, the next read may want the rest
                if len(self._record) < RECORD_SIZE:
                    self._record = bytearray(RECORD_SIZE)
                self._cached = -1
                self._open(record, cipher, memoryview(self._record)[: stop - start])
                self._cached = record
            view[lo - offset : hi - offset] = memoryview(self._record)[lo - start : hi - start]

    def chunks(self) -> Iterator[bytes]:
        for record, cipher in self._records(0, self.records):
            content = self._open(record, cipher)
            if content:
                yield content

    def read_pages(self, positions: npt.NDArray[np.int64], out: npt.NDArray[np.uint8]) -> None:
        """Each record that holds a wanted page is read and decrypted once (a group of them
        at a time): straight into ``out`` if every page of it is wanted, else into a scratch
        buffer the pages are then taken from."""
        if not positions.size:
            return
        numbers = positions // RECORD_PAGES
        wanted, starts = first_of_runs(numbers)  # positions come sorted
        bounds = np.append(starts, positions.size)
        counts = np.diff(bounds)
        direct_ok = bool(out.flags.c_contiguous)
        scratch = np.empty((0, RECORD_SIZE), dtype=np.uint8)
        for group in range(0, wanted.size, GROUP_RECORDS):
            these = wanted[group : group + GROUP_RECORDS]
            partial = np.zeros(these.size, dtype=np.bool_)
            # Runs of consecutive records, each read at once.
            breaks = (np.flatnonzero(np.diff(these) != 1) + 1).tolist()
            for a, b in zip([0, *breaks], [*breaks, these.size], strict=True):
                for record, cipher in self._records(int(these[a]), b - a):
                    row = a + record - int(these[a])
                    lo, hi = int(bounds[group + row]), int(bounds[group + row + 1])
                    length = self._plain_len(record)
                    if direct_ok and (hi - lo) * PAGE_SIZE == length:  # all of it: in place
                        self._open(record, cipher, out[lo:hi].data.cast("B"))
                        continue
                    if scratch.shape[0] < these.size:
                        scratch = np.empty((these.size, RECORD_SIZE), dtype=np.uint8)
                    self._open(record, cipher, scratch[row].data.cast("B")[:length])
                    partial[row] = True
            if partial.any():
                lo, hi = int(bounds[group]), int(bounds[group + these.size])
                mask = np.repeat(partial, counts[group : group + these.size])
                rows = np.searchsorted(these, numbers[lo:hi][mask])
                pages = scratch[: these.size].reshape(these.size, RECORD_PAGES, PAGE_SIZE)
                out[lo:hi][mask] = pages[rows, positions[lo:hi][mask] % RECORD_PAGES]


# --- writers ------------------------------------------------------------------------------


class Writer(Protocol):
    """Takes a new file's content and writes it as the codec holds it."""

    def write(self, view: memoryview) -> None: ...

    def finish(self) -> None: ...


class PlainWriter:
    def __init__(self, out: BinaryIO) -> None:
        self.out = out

    def write(self, view: memoryview) -> None:
        self.out.write(view)

    def finish(self) -> None:
        pass


class SealedWriter:
    """Writes the header, then a record per RECORD_SIZE bytes of content: a full record is
    sealed once more content follows it (only the last record is marked last)."""

    def __init__(self, out: BinaryIO, codec: SealedCodec, layer: str, name: str) -> None:
        self.out = out
        salt = secrets.token_bytes(SALT_SIZE)
        self._aead = codec.file_cipher(salt)
        self._ad = _ad_prefix(codec.store_id, layer, name)
        self._record = bytearray(RECORD_SIZE)
        self._fill = 0
        self._number = 0
        self._cipher = bytearray(RECORD_DISK)
        out.write(HEADER.pack(MAGIC, VERSION, ALGORITHM_ID, RECORD_SIZE, salt))

    def _seal(self, data: memoryview, last: bool) -> None:
        cipher = memoryview(self._cipher)[: data.nbytes + TAG_SIZE]
        ad = self._ad + struct.pack("<Q", self._number) + (b"\1" if last else b"\0")
        self._aead.encrypt_into(_nonce(self._number), data, ad, cipher)
        self.out.write(cipher)
        self._number += 1

    def write(self, view: memoryview) -> None:
        size = view.nbytes
        if not size:
            return
        pos = 0
        if self._fill == RECORD_SIZE:  # more content follows: that one was not the last
            self._seal(memoryview(self._record), last=False)
            self._fill = 0
        if self._fill:
            take = min(RECORD_SIZE - self._fill, size)
            self._record[self._fill : self._fill + take] = view[:take]
            self._fill += take
            pos = take
            if self._fill == RECORD_SIZE and pos < size:
                self._seal(memoryview(self._record), last=False)
                self._fill = 0
        while size - pos > RECORD_SIZE:  # whole records straight from the caller's buffer
            self._seal(view[pos : pos + RECORD_SIZE], last=False)
            pos += RECORD_SIZE
        if pos < size:
            self._record[: size - pos] = view[pos:]
            self._fill = size - pos

    def finish(self) -> None:
        self._seal(memoryview(self._record)[: self._fill], last=True)


# --- codecs -------------------------------------------------------------------------------


class Codec:
    """How a store holds its layer files: this one in the clear (every store made without
    ``--encrypt``; the format of every store before 1.4)."""

    encryption: str | None = None

    def disk_size(self, size: int) -> int:
        return size

    def reader(self, fd: int, size: int, layer: str, name: str, step: str) -> LayerFile:
        return PlainFile(fd, size, layer, name, step)

    def writer(self, out: BinaryIO, layer: str, name: str) -> Writer:
        return PlainWriter(out)


PLAIN = Codec()


class SealedCodec(Codec):
    """An encrypted store's: files sealed under keys derived from the store's key."""

    encryption = ALGORITHM

    def __init__(self, store_id: str, store_key: bytes) -> None:
        self.store_id = store_id
        self._data_key = _hkdf(store_key, None, DATA_KEY_INFO)

    def __repr__(self) -> str:
        return f"SealedCodec({self.store_id})"

    def file_cipher(self, salt: bytes) -> ChaCha20Poly1305:
        return _aead(_hkdf(self._data_key, salt, FILE_KEY_INFO))

    def disk_size(self, size: int) -> int:
        return sealed_size(size)

    def reader(self, fd: int, size: int, layer: str, name: str, step: str) -> LayerFile:
        return SealedFile(fd, size, layer, name, step, self)

    def writer(self, out: BinaryIO, layer: str, name: str) -> Writer:
        return SealedWriter(out, self, layer, name)
