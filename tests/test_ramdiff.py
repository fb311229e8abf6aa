"""precopy-diff in bounded memory: a migration received as its difference from a parent in a
file (`RamDiff`, `RamFile`), the parent kept on this host (`ParentRam`), and the store's
compose into a file. Each must give the pages the whole-image diff gives."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.test_images import BLOCKS, content, delta, mutate, random_image, write_chain
from vmckpt.images import LayerContent, Store
from vmckpt.mechanisms.parent_ram import STATE_FILE, ParentRam
from vmckpt.ram import (
    PAGE_SIZE,
    PageNumbers,
    RamBlock,
    RamDiff,
    RamFile,
    RamImage,
    SpilledPages,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261206)


@pytest.fixture
def spill() -> Iterator[int]:
    with tempfile.TemporaryFile() as handle:
        yield handle.fileno()


def as_file(image: RamImage, fd: int) -> RamFile:
    ram = RamFile.empty(fd, image.blocks)
    for block in image.blocks:
        numbers = np.arange(block.pages, dtype=np.int64)
        ram.put_pages(block.idstr, numbers, image.pages_of(block.idstr))
    return ram


def read_back(ram: RamFile) -> RamImage:
    image = RamImage.zeroed(ram.blocks)
    for block in ram.blocks:
        ram.get(block.idstr, np.arange(block.pages, dtype=np.int64), image.pages_of(block.idstr))
    return image


def send(target: RamDiff | RamImage, image: RamImage, rng: np.random.Generator) -> None:
    """What a precopy stream does: every page once (non-zero ones as runs of page records
    seen through a strided view, zero ones as zero records), in batches; then a few rounds
    that send pages again with data that is not final (later copies win, some repeated
    inside one batch); then the final copies. Pages of the last block are never sent."""
    for block in image.blocks[:-1]:
        pages = image.pages_of(block.idstr)
        nonzero = image.nonzero_pages(block.idstr).astype(np.int64)
        zero = np.setdiff1d(np.arange(block.pages), nonzero).astype(np.int64)
        target.put_zeros(block.idstr, zero)
        for batch in np.array_split(nonzero, 5):
            stream = np.zeros((batch.size, 8 + PAGE_SIZE), dtype=np.uint8)
            stream[:, 8:] = pages[batch]
            target.put_pages(block.idstr, batch, stream[:, 8:])  # strided, as the decoder
        for _ in range(3):
            again = rng.choice(block.pages, size=min(40, block.pages), replace=True)
            noise = rng.integers(0, 256, size=(again.size, PAGE_SIZE), dtype=np.uint8)
            target.put_pages(block.idstr, again.astype(np.int64), noise)
            target.put_zeros(block.idstr, again[:3].astype(np.int64))
            target.put_pages(block.idstr, again.astype(np.int64), pages[again])  # final


def test_a_diff_against_a_parent_file_keeps_exactly_the_changed_pages(
    rng: np.random.Generator, spill: int
) -> None:
    parent = random_image(rng)
    new = mutate(parent, rng)
    back, cleared = (int(n) for n in parent.nonzero_pages("pc.ram")[:2])
    new.pages_of("pc.ram")[back] = parent.pages_of("pc.ram")[back]  # written back as it was
    new.pages_of("pc.ram")[cleared] = 0  # a page of data that became zero
    never = new.blocks[-1].idstr
    new.data[never][:] = 0  # the last block is never sent: zero, as in a RamImage
    with tempfile.TemporaryFile() as parent_file:
        diff = RamDiff(BLOCKS, as_file(parent, parent_file.fileno()), spill)
        send(diff, new, rng)
        kept, stored, zeroed = diff.result()
    want_pages, want_zeroed = delta(new, parent)
    for block in BLOCKS:
        np.testing.assert_array_equal(stored[block.idstr], want_pages[block.idstr])
        np.testing.assert_array_equal(zeroed[block.idstr], want_zeroed[block.idstr])
        rows = np.empty((stored[block.idstr].size, PAGE_SIZE), dtype=np.uint8)
        kept.take(block.idstr, stored[block.idstr], rows)
        np.testing.assert_array_equal(rows, new.pages_of(block.idstr)[stored[block.idstr]])
    assert cleared in zeroed["pc.ram"] and back not in stored["pc.ram"]
    assert zeroed[never].size == parent.nonzero_pages(never).size > 0


def test_a_diff_without_a_parent_keeps_every_nonzero_page(
    rng: np.random.Generator, spill: int
) -> None:
    image = random_image(rng)
    image.data[BLOCKS[-1].idstr][:] = 0
    diff = RamDiff(BLOCKS, None, spill)
    send(diff, image, rng)
    kept, stored, zeroed = diff.result()
    for block in BLOCKS:
        np.testing.assert_array_equal(stored[block.idstr], image.nonzero_pages(block.idstr))
        assert zeroed[block.idstr].size == 0
    assert kept.pages == sum(image.nonzero_pages(b.idstr).size for b in BLOCKS)


def test_the_receiver_image_and_the_diff_see_the_same_stream(
    rng: np.random.Generator, spill: int
) -> None:
    """The same records into a RamImage (the COLO opening, the tests' reader) give the image
    the diff describes."""
    image = random_image(rng)
    image.data[BLOCKS[-1].idstr][:] = 0
    received = RamImage.zeroed(BLOCKS)
    send(received, image, np.random.default_rng(1))
    for block in BLOCKS:
        np.testing.assert_array_equal(received.pages_of(block.idstr), image.pages_of(block.idstr))


def test_a_ram_file_round_trips_pages_in_any_order(rng: np.random.Generator) -> None:
    image = random_image(rng)
    with tempfile.TemporaryFile() as handle:
        ram = as_file(image, handle.fileno())
        for block in BLOCKS:
            assert np.array_equal(np.flatnonzero(ram.nonzero[block.idstr]),
                                  image.nonzero_pages(block.idstr))  # fmt: skip
        numbers = rng.permutation(BLOCKS[0].pages)[:100].astype(np.int64)
        out = np.empty((numbers.size, PAGE_SIZE), dtype=np.uint8)
        ram.get("pc.ram", numbers, out)
        np.testing.assert_array_equal(out, image.pages_of("pc.ram")[numbers])
        ram.put_zeros("pc.ram", numbers)
        image.pages_of("pc.ram")[numbers] = 0
        assert not ram.nonzero["pc.ram"][numbers].any()
        back = read_back(ram)
        for block in BLOCKS:
            np.testing.assert_array_equal(back.pages_of(block.idstr), image.pages_of(block.idstr))


def test_a_diff_refuses_a_parent_of_other_blocks(spill: int) -> None:
    with tempfile.TemporaryFile() as handle:
        parent = RamFile.empty(handle.fileno(), [RamBlock("pc.ram", 1 << 20)])
        with pytest.raises(ValueError, match="RAM blocks differ"):
            RamDiff(BLOCKS, parent, spill)


def test_compose_into_a_file_equals_compose(store: Store, rng: np.random.Generator) -> None:
    images = [random_image(rng)]
    images += [mutate(images[0], rng)]
    images += [mutate(images[1], rng)]
    layers = write_chain(store, images)
    with tempfile.TemporaryFile() as handle:
        ram = store.compose_into(layers[-1].id, lambda b: RamFile.empty(handle.fileno(), b))
        composed, _, _ = store.compose(layers[-1].id)
        back = read_back(ram)
    for block in BLOCKS:
        np.testing.assert_array_equal(back.pages_of(block.idstr), composed.pages_of(block.idstr))
        np.testing.assert_array_equal(back.pages_of(block.idstr), images[-1].pages_of(block.idstr))


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")


def test_the_parent_on_this_host_follows_the_head_and_is_rebuilt_when_unsure(
    store: Store, rng: np.random.Generator, spill: int
) -> None:
    images = [random_image(rng)]
    images += [mutate(images[0], rng)]
    layers = write_chain(store, images)
    with ParentRam.open(store, "tiny", "guest", layers[1]) as parent:  # composed
        assert parent.ram is not None
        assert_file_is(parent.ram, images[1])
        # The next checkpoint: received as a diff, committed, the file advanced to it.
        new = mutate(images[1], rng)
        new.data[BLOCKS[-1].idstr][:] = images[1].data[BLOCKS[-1].idstr]
        diff = RamDiff(BLOCKS, parent.ram, spill)
        send_all(diff, new)
        kept, stored, zeroed = diff.result()
        layer = store.write_layer(written(kept, stored, zeroed, layers[1].id, new))
        parent.advance(layer, kept, zeroed)
    composed, _, _ = store.compose(layer.id)
    for block in BLOCKS:
        np.testing.assert_array_equal(composed.pages_of(block.idstr), new.pages_of(block.idstr))
    with ParentRam.open(store, "tiny", "guest", layer) as again:  # read back, not composed
        assert again.ram is not None
        assert_file_is(again.ram, new)
        directory = again.directory
    # The state names another layer: the file is not taken for it, it is composed again.
    with ParentRam.open(store, "tiny", "guest", layers[0]) as older:
        assert older.ram is not None
        assert_file_is(older.ram, images[0])
    # A file damaged behind a state that still names the layer is this host's business
    # (private), but a state without its file's size is rebuilt.
    os.truncate(directory / "ram.bin", PAGE_SIZE)
    with ParentRam.open(store, "tiny", "guest", layers[0]) as rebuilt:
        assert rebuilt.ram is not None
        assert_file_is(rebuilt.ram, images[0])
    (directory / STATE_FILE).write_text("{not json")
    with ParentRam.open(store, "tiny", "guest", layers[0]) as rebuilt:
        assert rebuilt.ram is not None
        assert_file_is(rebuilt.ram, images[0])


def send_all(target: RamDiff, image: RamImage) -> None:
    for block in image.blocks:
        numbers = np.arange(block.pages, dtype=np.int64)
        target.put_pages(block.idstr, numbers, image.pages_of(block.idstr))


def written(
    kept: SpilledPages,
    stored: dict[str, PageNumbers],
    zeroed: dict[str, PageNumbers],
    parent: str,
    new: RamImage,
) -> LayerContent:
    base = content(new, parent, None)
    return LayerContent(**{**base.__dict__, "ram": kept, "pages": stored, "zeroed": zeroed})


def assert_file_is(ram: RamFile, image: RamImage) -> None:
    back = read_back(ram)
    for block in image.blocks:
        np.testing.assert_array_equal(back.pages_of(block.idstr), image.pages_of(block.idstr))
        np.testing.assert_array_equal(
            np.flatnonzero(ram.nonzero[block.idstr]), image.nonzero_pages(block.idstr)
        )


def test_short_alternating_records_end_as_the_image_they_describe(
    rng: np.random.Generator, spill: int
) -> None:
    """A migration's last passes: runs of a few page records and a few zero records, pages
    sent again in any order. Gathered and diffed a batch at a time, the newest record of
    each page must still win: the diff against the parent describes exactly the image the
    same records make of the parent."""
    parent = random_image(rng)
    with tempfile.TemporaryFile() as parent_file:
        diff = RamDiff(BLOCKS, as_file(parent, parent_file.fileno()), spill)
        image = RamImage(list(parent.blocks), {k: v.copy() for k, v in parent.data.items()})
        for block in BLOCKS:  # the first pass: every page, so none is "never sent"
            numbers = np.arange(block.pages, dtype=np.int64)
            for target in (diff, image):
                target.put_pages(block.idstr, numbers, parent.pages_of(block.idstr))
        for _ in range(3000):
            block = BLOCKS[int(rng.integers(0, 2))]
            top = min(40, block.pages)
            numbers = rng.integers(0, top, size=int(rng.integers(1, 6))).astype(np.int64)
            if rng.random() < 0.4:
                for target in (diff, image):
                    target.put_zeros(block.idstr, numbers)
            else:
                kind = rng.random()
                if kind < 0.3:  # written back as the parent has it
                    rows = parent.pages_of(block.idstr)[numbers].copy()
                else:
                    rows = rng.integers(0, 256, size=(numbers.size, PAGE_SIZE), dtype=np.uint8)
                for target in (diff, image):
                    target.put_pages(block.idstr, numbers, rows)
        kept, stored, zeroed = diff.result()
    want_pages, want_zeroed = delta(image, parent)
    for block in BLOCKS:
        np.testing.assert_array_equal(stored[block.idstr], want_pages[block.idstr])
        np.testing.assert_array_equal(zeroed[block.idstr], want_zeroed[block.idstr])
        rows = np.empty((stored[block.idstr].size, PAGE_SIZE), dtype=np.uint8)
        kept.take(block.idstr, stored[block.idstr], rows)
        np.testing.assert_array_equal(rows, image.pages_of(block.idstr)[stored[block.idstr]])
    assert sum(z.size for z in zeroed.values()) > 0 and kept.pages > 0
