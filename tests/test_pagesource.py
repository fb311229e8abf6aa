"""The store's page source (vmckpt/images/pagesource.py): the page index of a chain, pages read
one at a time or a run at a time, each checked as it is read; the same answers as compose."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import numpy.typing as npt
import pytest

from tests.test_images import (
    ChainT,
    as_1_1,
    flip_byte,
    layer_path,
    mutate,
    needed_position,
    random_image,
    write_chain,
)
from vmckpt.errors import CorruptLayerError
from vmckpt.images import Store
from vmckpt.images.pagesource import ZERO, NoPageDigests, PageSource
from vmckpt.ram import PAGE_SIZE, RamImage, distinct, first_of_runs, quantile


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261206)


def make_chain(path: str, rng: np.random.Generator, *, encrypt: bool = False) -> ChainT:
    """A base layer and two deltas (tests/test_images.py's chain3), with their images."""
    store = Store.create(path, encrypt=encrypt)
    images = [random_image(rng)]
    images.append(mutate(images[0], rng))
    images.append(mutate(images[1], rng))
    return store, write_chain(store, images), images


@pytest.fixture
def chain3(tmp_path: os.PathLike[str], rng: np.random.Generator) -> ChainT:
    return make_chain(f"{tmp_path}/store", rng)


def page_of(image: RamImage, source: PageSource, page: int) -> npt.NDArray[np.uint8]:
    block = int(np.searchsorted(source.block_starts, page, side="right")) - 1
    row: npt.NDArray[np.uint8] = image.pages_of(source.blocks[block].idstr)[
        page - int(source.block_starts[block])
    ]
    return row


def check_every_page(source: PageSource, image: RamImage) -> None:
    """Each stored page reads as the image holds it; every other page is zero there."""
    with source.reader() as reader:
        for chunk in source.push_order(37):
            rows = np.empty((chunk.size, PAGE_SIZE), dtype=np.uint8)
            reader.read(chunk, rows)
            for page, row in zip(chunk.tolist(), rows, strict=True):
                np.testing.assert_array_equal(row, page_of(image, source, page))
    for page in np.flatnonzero(source.owner == ZERO).tolist():
        assert not page_of(image, source, page).any(), page


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear", "encrypted"])
def test_every_layer_serves_what_it_composes_to(
    tmp_path: os.PathLike[str], rng: np.random.Generator, encrypt: bool
) -> None:
    store, manifests, images = make_chain(f"{tmp_path}/store", rng, encrypt=encrypt)
    for manifest, image in zip(manifests, images, strict=True):
        with PageSource.open(store, manifest.id) as source:
            assert [b.idstr for b in source.blocks] == [b.idstr for b in image.blocks]
            assert source.total_pages == sum(b.pages for b in image.blocks)
            nonzero = sum(image.nonzero_pages(b.idstr).size for b in image.blocks)
            assert source.stored.size == nonzero
            assert source.stored_bytes == nonzero * PAGE_SIZE
            check_every_page(source, image)
            # prelude and device state: the newest layer's own
            _ram, prelude, device = store.compose(manifest.id)
            assert (source.prelude, source.device_state) == (prelude, device)


def test_pages_in_any_order_and_the_push_covers_each_once(chain3: ChainT) -> None:
    store, manifests, images = chain3
    with PageSource.open(store, manifests[2].id) as source:
        pushed = np.concatenate(list(source.push_order(50)))
        assert np.array_equal(np.sort(pushed), source.stored)  # each stored page once
        chosen = np.random.default_rng(7).permutation(source.stored)[:60]
        with source.reader() as reader:
            rows = np.empty((chosen.size, PAGE_SIZE), dtype=np.uint8)
            reader.read(chosen, rows)
        for page, row in zip(chosen.tolist(), rows, strict=True):
            np.testing.assert_array_equal(row, page_of(images[2], source, page))
        # the newest version wins: a page the delta rewrote is read from the delta
        owners = set(source.owner[source.stored].tolist())
        assert owners == {0, 1, 2}
        with source.reader() as reader, pytest.raises(ValueError, match="zero"):
            zero = np.flatnonzero(source.owner == ZERO)[:1].astype(np.int64)
            reader.read(zero, np.empty((1, PAGE_SIZE), dtype=np.uint8))


def test_a_damaged_page_is_found_when_read_not_when_opened(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    position = needed_position(store, manifests[2].id, manifests[0].id)
    flip_byte(layer_path(store, manifests[0].id, "pages.bin"), position * PAGE_SIZE + 9)
    with PageSource.open(store, manifests[2].id) as source:  # opening reads no page
        first = int(np.flatnonzero((source.owner == 0) & (source.position == position))[0])
        with source.reader() as reader:
            rows = np.empty((1, PAGE_SIZE), dtype=np.uint8)
            with pytest.raises(CorruptLayerError) as caught:
                reader.read(np.array([first], dtype=np.int64), rows)
    line = caught.value.one_line()
    assert f"layer {manifests[0].id}" in line and f"page {position} " in line
    assert "does not match its digest in pages.sum" in line


def test_damaged_index_digests_or_truncation_fail_at_open(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    for name, match in (
        ("pages.idx", r"pages\.idx: sha256 mismatch"),
        ("pages.sum", r"pages\.sum: sha256 mismatch"),
    ):
        path = layer_path(store, manifests[1].id, name)
        original = path.read_bytes()
        flip_byte(path, 0)
        with pytest.raises(CorruptLayerError, match=match):
            PageSource.open(store, manifests[2].id)
        path.write_bytes(original)
    path = layer_path(store, manifests[0].id, "pages.bin")
    os.truncate(path, path.stat().st_size - PAGE_SIZE)
    with pytest.raises(CorruptLayerError, match="truncated"):
        PageSource.open(store, manifests[2].id)


def test_layers_without_page_digests_cannot_be_served(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    as_1_1(store, manifests[0].id)
    with pytest.raises(NoPageDigests) as caught:
        PageSource.open(store, manifests[2].id)
    assert f"layer {manifests[0].id} (format 1.1) has no page digests" in caught.value.message


def test_readers_have_their_own_descriptors(chain3: ChainT) -> None:
    store, manifests, images = chain3
    source = PageSource.open(store, manifests[1].id)
    first, second = source.reader(), source.reader()
    source.close()  # the readers keep their duplicates open
    second.close()
    pages = source.stored[:5]
    rows = np.empty((pages.size, PAGE_SIZE), dtype=np.uint8)
    first.read(pages, rows)
    first.close()
    for page, row in zip(pages.tolist(), rows, strict=True):
        np.testing.assert_array_equal(row, page_of(images[1], source, page))


def test_indexes_and_digests_read_ahead_are_taken_once_and_damage_still_fails_the_open(
    chain3: ChainT,
) -> None:
    """A page server reads the chain's indexes and digests in a thread while it imports
    (LayerReader.prefetch): the open then reads neither again, and a file damaged before
    the read ahead still fails the open, named."""
    store, manifests, images = chain3
    names = ("pages.idx", "pages.sum")
    newest_first = list(reversed(manifests))
    store.reader.prefetch(newest_first, names, "test")
    moved = [(layer_path(store, m.id, n), layer_path(store, m.id, n + ".away"))
             for m in manifests for n in names]  # fmt: skip
    for path, away in moved:
        path.rename(away)
    with PageSource.open(store, manifests[2].id) as source:  # read ahead: no file read again
        check_every_page(source, images[2])
    with pytest.raises(CorruptLayerError, match=r"pages\.idx is missing"):
        PageSource.open(store, manifests[2].id)  # each was taken once
    for path, away in moved:
        away.rename(path)

    flip_byte(layer_path(store, manifests[1].id, "pages.sum"), 0)
    store.reader.prefetch(newest_first, names, "test")  # stops there, raises nothing
    with pytest.raises(CorruptLayerError, match=r"pages\.sum: sha256 mismatch") as caught:
        PageSource.open(store, manifests[2].id)
    assert f"layer {manifests[1].id}" in caught.value.one_line()


def test_distinct_is_what_numpy_unique_gives(rng: np.random.Generator) -> None:
    for size in (0, 1, 2, 7, 1000):
        values = rng.integers(0, max(1, size // 3), size=size, dtype=np.int64)
        assert np.array_equal(distinct(values), np.unique(values)), size
    assert np.array_equal(distinct(np.array([5, 5, 5], dtype=np.uint8)), [5])


def test_first_of_runs_and_quantile_are_what_numpy_gives(rng: np.random.Generator) -> None:
    for size in (0, 1, 2, 7, 1000):
        values = np.sort(rng.integers(0, max(1, size // 3), size=size, dtype=np.int64))
        wanted, starts = first_of_runs(values)
        expected_values, expected_starts = np.unique(values, return_index=True)
        assert np.array_equal(wanted, expected_values), size
        assert np.array_equal(starts, expected_starts), size
    for size in (1, 2, 5, 500):
        samples = rng.random(size).tolist()
        for q in (0.0, 0.5, 0.99, 1.0):
            assert quantile(samples, q) == pytest.approx(float(np.quantile(samples, q))), (size, q)


@pytest.mark.parametrize("encrypt", [False, True], ids=["clear", "encrypted"])
def test_serving_a_first_page_and_recording_it_imports_nothing_more(
    tmp_path: os.PathLike[str], rng: np.random.Generator, encrypt: bool
) -> None:
    """A page server answers the first page QEMU asks for (while loading the device state,
    the guest not yet running), and writes the record its restore command waits for,
    without an import on the way: numpy 2's np.unique and np.quantile import numpy.ma on
    their first call (~10-20 ms). A fresh interpreter: this one imported it long ago."""
    store, manifests, _ = make_chain(f"{tmp_path}/store", rng, encrypt=encrypt)
    script = f"""
import sys
from vmckpt.images import Store
from vmckpt.images.pagesource import PageSource
from vmckpt.lazy_numpy import np
from vmckpt.mechanisms.pageserver.destination import Destination
from vmckpt.stream import postcopy as pc
source = PageSource.open(Store({str(store.path)!r}), {manifests[2].id!r})
destination = Destination("g", source, 2)
sent = []
destination.send = lambda buffers: sent.append(b"".join(bytes(b) for b in buffers))
before = set(sys.modules)
page = int(source.stored[len(source.stored) // 2])
destination.requests.append((pc.PageRequest(page, 1), 0.0))
with source.reader() as reader:
    destination.serve_requests(reader)
assert len(sent) == 1 and destination.sent[page], sent
assert destination.counters.latency_ms(0.5) == destination.counters.latency_ms(0.99) > 0
print(sorted(set(sys.modules) - before))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
