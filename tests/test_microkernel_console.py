"""The Genode and Fiasco.OC console checks themselves, on written consoles (no guest boots):
each check is shown to fail on the defect it exists for."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.framework.microkernel import (
    SYSTEMS,
    MissingImage,
    TickLedger,
    check_continuation,
    console_lines,
    find_image,
)

GENODE = SYSTEMS["genode-iso"]
FIASCO = SYSTEMS["fiasco"]


def genode_line(n: int, checksum: str, ms: int) -> bytes:
    return (
        f"[init -> test-ckpt_counter] tick={n} sum=0x{checksum} ms={ms}\x1b[0m\x1b[0m\r\n".encode()
    )


def fiasco_line(n: int, checksum: str, rng: str, status: str = "ok") -> bytes:
    line = f"ticker  | TICK {n} t_us={n * 200000} sum={checksum} rng={rng} {status}"
    return f"\x1b[37m{line}\x1b[0m\r\n".encode()


def genode_sum(n: int) -> str:
    return f"{n:016x}"


def test_genode_console_torn_first_line_and_unfinished_last_line_are_not_ticks() -> None:
    raw = (
        b"34a9 ms=3821\x1b[0m\x1b[0m\r\n"  # the rest of a line the checkpoint cut
        + genode_line(21, genode_sum(21), 4015)
        + b"[init -> test-ckpt_counter] tick=22 sum=0x0000000000000016 ms=42"  # no newline yet
    )
    lines = console_lines(raw)
    assert lines[0] == "34a9 ms=3821"
    assert [t.n for t in GENODE.ticks(lines)] == [21]


def test_fiasco_console_ansi_is_stripped_and_mismatch_is_kept() -> None:
    raw = (
        b"K 19 t_us=4008000 sum=b2313de6 rng=92bdd8d8 ok\x1b[0m\r\n"
        + fiasco_line(20, "73bbc221", "f4689392")
        + fiasco_line(21, "00000000", "11111111", "MISMATCH")
    )
    ticks = FIASCO.ticks(console_lines(raw))
    assert [(t.n, t.sum, t.ok) for t in ticks] == [
        (20, "73bbc221 f4689392", True),
        (21, "00000000 11111111", False),
    ]


def _ledger() -> TickLedger:
    ledger = TickLedger()
    ledger.add("original", GENODE.ticks(console_lines(b"".join(
        genode_line(n, genode_sum(n), n * 200) for n in range(1, 31)
    ))))  # fmt: skip
    return ledger


def _restored(numbers: range, *, bad: int | None = None, prefix: bytes = b"") -> list[str]:
    body = b"".join(
        genode_line(n, "f" * 16 if n == bad else genode_sum(n), n * 200) for n in numbers
    )
    return console_lines(prefix + body)


def test_genode_continuation_accepts_the_next_tick_with_equal_sums() -> None:
    ticks = check_continuation(
        GENODE, _restored(range(11, 41)), _ledger(), source="restored", after=(10, 12)
    )
    assert ticks[0].n == 11 and ticks[-1].n == 40


@pytest.mark.parametrize(
    ("lines", "after", "needle"),
    [
        (_restored(range(15, 30)), (10, 12), "continues at tick 15"),
        (_restored(range(11, 20)) + _restored(range(21, 25)), (10, 12), "do not count on by one"),
        (_restored(range(11, 25), bad=13), (10, 12), "tick 13: restored printed"),
        (_restored(range(11, 25), prefix=b"Bender: Hello World.\r\n"), (10, 12), "booted again"),
        ([], (10, 12), "no tick line"),
    ],
    ids=["late", "gap", "checksum", "reboot", "silent"],
)
def test_genode_continuation_refuses(lines: list[str], after: tuple[int, int], needle: str) -> None:
    with pytest.raises(AssertionError, match=needle):
        check_continuation(GENODE, lines, _ledger(), source="restored", after=after)


def test_fiasco_continuation_refuses_mismatch() -> None:
    ledger = TickLedger()
    ledger.add("original", FIASCO.ticks(console_lines(fiasco_line(5, "aaaaaaaa", "bbbbbbbb"))))
    lines = console_lines(fiasco_line(5, "aaaaaaaa", "bbbbbbbb", "MISMATCH"))
    with pytest.raises(AssertionError, match="MISMATCH at \\[5\\]"):
        check_continuation(FIASCO, lines, ledger, source="restored", after=(4, 4))


def test_genode_and_fiasco_images_missing_say_where_to_put_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FIASCO_IMAGE", str(tmp_path / "nope.elf"))
    with pytest.raises(MissingImage, match=r"no Fiasco.OC ticker at FIASCO_IMAGE=.*nope.elf"):
        find_image("FIASCO_IMAGE", "fiasco-l4re/bootstrap_ticker.elf", "Fiasco.OC ticker")
    monkeypatch.delenv("FIASCO_IMAGE")
    monkeypatch.delenv("GENODE_ISO", raising=False)  # `make test` exports the shared one
    monkeypatch.setenv("GUEST_IMAGES", str(tmp_path))
    with pytest.raises(MissingImage) as missing:
        find_image("GENODE_ISO", "genode-hw-pc/nothing-here.iso", "Genode ISO")
    message = str(missing.value)
    assert "\n" not in message
    assert f"put genode-hw-pc/nothing-here.iso in {tmp_path}" in message
    assert "GENODE_ISO=PATH" in message
    (tmp_path / "genode-hw-pc").mkdir()
    (tmp_path / "genode-hw-pc" / "here.iso").write_bytes(b"iso")
    found = find_image("GENODE_ISO", "genode-hw-pc/here.iso", "Genode ISO")
    assert found == tmp_path / "genode-hw-pc" / "here.iso"
