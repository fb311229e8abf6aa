"""The tests' one wait (tests/framework/guest.py): it returns what it waited for, and when
time runs out it says what did not happen, with the evidence."""

from __future__ import annotations

import itertools

import pytest

from tests.framework.guest import tail, wait_for


def test_it_returns_what_the_condition_found() -> None:
    counter = itertools.count()
    found = wait_for(lambda: n if (n := next(counter)) >= 3 else None, "counting to 3", 5, poll=0)
    assert found == 3


def test_a_wait_that_times_out_says_what_and_shows_the_evidence() -> None:
    with pytest.raises(AssertionError) as timed_out:
        wait_for(
            lambda: [],
            "the guest printing 5 STATE lines",
            0.05,
            poll=0.01,
            evidence=lambda: tail("boot\n" + "".join(f"line {n}\n" for n in range(30)), 2),
        )
    message = str(timed_out.value)
    assert message.startswith("the guest printing 5 STATE lines did not happen within 0 s")
    assert "(last seen: [])" in message
    assert message.endswith("evidence:\nline 28\nline 29")


def test_an_error_in_the_condition_is_not_waited_out() -> None:
    calls = []

    def broken() -> bool:
        calls.append(1)
        raise OSError("the console log is gone")

    with pytest.raises(OSError, match="console log is gone"):
        wait_for(broken, "anything", 60)
    assert len(calls) == 1
