"""Is a guest alive: the verdicts of vmckpt/machine/liveness.py on what QEMU and the console showed.

These build observations by hand (no guest boots); tests/test_verify_boot.py
shows each verdict on real guests.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from vmckpt.machine.liveness import ConsoleReader, Observation, clean_console


def test_clean_console_keeps_complete_lines_without_ansi() -> None:
    raw = b"\x1b[37mhello   | Hello World!\x1b[0m\r\n\r\n\x1bc\x1b[1;32mWelcome\x1b[0m\r\nhalf a li"
    assert clean_console(raw) == ["hello   | Hello World!", "Welcome"]


ALIVE = Observation(
    seconds=5.0, status="running", console_bytes=120, console_lines=4, last_output_s=4.6
)
# One line at once (a boot loader's error, say), then nothing: not alive.
BURST = Observation(
    seconds=3.0, status="running", console_bytes=53, console_lines=1, last_output_s=0.2
)


@pytest.mark.parametrize(
    ("observation", "verdict"),
    [
        (ALIVE, "alive"),
        (BURST, "silent"),
        (Observation(5.0, status="running"), "silent"),
        (
            Observation(5.0, (("RESET", "guest-reset", 0.6),), status="running", console_bytes=9),
            "reset",
        ),
        (Observation(5.0, (("STOP", "", 1.0),), status="paused", console_bytes=9), "stopped"),
        (Observation(5.0, status="internal-error", console_bytes=9), "stopped"),
        (Observation(1.2, (("SHUTDOWN", "guest-shutdown", 1.1),), exited=True), "dead"),
        (Observation(1.2, exited=True, qemu_said="qemu: terminating on signal 9"), "dead"),
        (Observation(5.0, status="shutdown"), "dead"),
        (
            Observation(
                5.0, (("GUEST_PANICKED", "pause", 1.0), ("STOP", "", 1.0)), status="guest-panicked"
            ),
            "panicked",
        ),
        # A panic that QEMU answers by powering off is still a panic, not just a death.
        (
            Observation(
                1.0,
                (("GUEST_PANICKED", "poweroff", 0.5), ("SHUTDOWN", "guest-panic", 0.5)),
                exited=True,
            ),
            "panicked",
        ),
    ],
)
def test_verdicts(observation: Observation, verdict: str) -> None:
    assert observation.verdict == verdict
    assert observation.fatal == (verdict in {"dead", "panicked", "reset"})


def test_evidence_names_the_facts_in_one_line() -> None:
    looping = Observation(
        5.0,
        (("RESET", "guest-reset", 0.6), ("RESET", "guest-reset", 1.2)),
        status="running",
        console_bytes=1800,
        console_lines=35,
        last_lines=("Bender: Hello World.",),
    )
    text = looping.evidence()
    assert "\n" not in text
    assert "2 RESET (guest-reset)" in text
    assert "35 new line(s)" in text and "'Bender: Hello World.'" in text
    assert "console: no output" in Observation(5.0, status="running").evidence()
    assert "no panic, reset or shutdown event" in ALIVE.evidence()
    assert "then nothing for 2.8 s" in BURST.evidence()
    assert "then nothing" not in ALIVE.evidence()
    dead = Observation(1.0, exited=True, qemu_said="qemu: terminating on signal 15")
    assert "QEMU exited, saying 'qemu: terminating on signal 15'" in dead.evidence()
    quiet = Observation(1.0, exited=True, qemu_said="(QEMU printed nothing)")
    assert "QEMU exited;" in quiet.evidence()
    assert dead.to_dict()["verdict"] == "dead"


def test_console_is_read_as_it_grows_lines_split_across_reads(tmp_path: Path) -> None:
    log = tmp_path / "serial.log"
    log.write_bytes(b"from an earlier moment\n")
    console = ConsoleReader(log, position=log.stat().st_size)
    console.read()
    assert (console.written, console.lines) == (0, 0)
    with log.open("ab") as handle:
        handle.write(b"\x1b[37mTICK 1 ok\x1b[0m\r\nTICK 2 o")
    console.read()
    assert (console.lines, console.last) == (1, ("TICK 1 ok",))
    with log.open("ab") as handle:
        handle.write(b"k\r\n\r\nTICK 3 ok\r\nTICK 4 ok\r\n")
    console.read()
    assert console.lines == 4
    assert console.last == ("TICK 2 ok", "TICK 3 ok", "TICK 4 ok")
    assert console.written == log.stat().st_size - len(b"from an earlier moment\n")
