"""The benchmark's bookkeeping, without QEMU: pauses from events, STATE gaps, the table."""

from __future__ import annotations

from benchmarks.checkpoint import (
    MethodRun,
    Sample,
    expected_distinct_pages,
    format_encryption,
    format_sweep,
    format_table,
    pause_from_events,
)
from benchmarks.colo_pause_trace import PHASES, format_breakdown, parse_pauses
from vmckpt.qmp import Event


def _event(name: str, at: float) -> Event:
    return Event(name, {}, at)


def test_pause_sums_stop_resume_pairs() -> None:
    events = [
        _event("MIGRATION", 0.0),
        _event("STOP", 1.0),
        _event("RESUME", 1.05),
        _event("STOP", 2.0),
        _event("RESUME", 2.01),
    ]
    total, pairs = pause_from_events(events)
    assert pairs == 2
    assert abs(total - 60.0) < 1e-6


def test_unmatched_stop_counts_nothing() -> None:
    assert pause_from_events([_event("STOP", 1.0)]) == (0.0, 0)


def test_table_reports_base_apart_and_errors() -> None:
    vmckpt = MethodRun(256, 100, "precopy-diff", t0=0.0, state_times=[0.1, 0.2, 0.5, 0.6])
    vmckpt.samples = [
        Sample(10.0, 1.0, 100 << 20, 0.0, pages_stored=25000, base=True),
        Sample(20.0, 0.5, 4 << 20, 1.0, pages_stored=1000),
        Sample(30.0, 0.5, 4 << 20, 2.0, pages_stored=900),
    ]
    failed = MethodRun(256, 100, "background-snapshot", error="QEMU refused it")
    table = format_table([vmckpt, failed])
    assert "precopy-diff base layer: 25000 pages" in table
    assert "error: QEMU refused it" in table
    assert abs((vmckpt.max_gap_ms() or 0) - 300.0) < 1e-6
    row = next(line for line in table.splitlines() if line.startswith("precopy-diff "))
    assert row.split()[1] == "2"  # the base layer is not among the measured samples


def test_expected_distinct_pages() -> None:
    assert expected_distinct_pages(0) == 0.0
    assert 960 < expected_distinct_pages(1000, 16384) < 980
    assert expected_distinct_pages(10**7, 16384) <= 16384


def test_sweep_compares_the_largest_guest_with_the_smallest() -> None:
    runs = []
    for memory, wall in ((256, 0.02), (4096, 0.025)):
        run = MethodRun(memory, 100, "colo", t0=0.0)
        run.samples = [
            Sample(900.0, 5.0, 500 << 20, 0.0, pages_stored=40000, base=True, cpu_s=2.0),
            Sample(2.0, wall, 600 << 10, 1.0, pages_stored=150, cpu_s=0.01, rss_mib=80.0),
            Sample(2.2, wall, 620 << 10, 2.0, pages_stored=160, cpu_s=0.01, rss_mib=81.0),
        ]
        runs.append(run)
    table = format_sweep(runs)
    assert "4096 MiB against 256 MiB" in table
    assert "wall 1.25x" in table  # 25 ms against 20 ms
    assert "pause 1.00x" in table  # 2.1 ms both
    row = next(line for line in table.splitlines() if line.startswith("colo ") and " 4096 " in line)
    assert row.split()[5] == "25"  # wall ms, the base layer left out


def test_encryption_table_sets_each_method_against_itself_in_the_clear() -> None:
    runs = []
    for method, wall, on_disk, compose in (
        ("precopy-diff", 0.20, 4 << 20, [0.10, 0.12, 0.11]),
        ("precopy-diff+enc", 0.25, (4 << 20) + 300, [0.13, 0.14, 0.15]),
        ("colo", 0.05, 1 << 20, [0.2]),  # without its +enc run: no pair, no row
    ):
        run = MethodRun(256, 100, method, t0=0.0, compose_s=compose)
        run.samples = [
            Sample(900.0, 9.0, 100 << 20, 0.0, pages_stored=25000, base=True, cpu_s=5.0),
            Sample(4.0, wall, 4 << 20, 1.0, cpu_s=wall / 2, extra={"disk_bytes": on_disk}),
            Sample(6.0, wall, 4 << 20, 2.0, cpu_s=wall / 2, extra={"disk_bytes": on_disk}),
        ]
        runs.append(run)
    table = format_encryption(runs)
    rows = [line.split() for line in table.splitlines()[2:]]
    assert [row[0] for row in rows[:2]] == ["precopy-diff", "precopy-diff+enc"]
    assert rows[0][3:] == ["200", "100", "5.0", "4096", "0.110"]  # the base layer left out
    assert rows[1][3:] == ["250", "125", "5.0", "4096", "0.140"]
    assert "precopy-diff+enc / precopy-diff: wall 1.25x, CPU 1.25x, pause 1.00x" in table
    assert "compose 1.27x" in table
    assert not any(row[0] == "colo" for row in rows)
    assert format_encryption(runs[2:]) == ""


def test_microkernel_table_reports_genode_fiasco_and_linux_rows() -> None:
    from benchmarks.microkernels import Result, format_table

    def layer(pause: float, size: int) -> dict[str, object]:
        return {"pause_ms": pause, "bytes": size, "total_s": 0.5}

    genode = Result("genode-iso", "Genode", "10.0.2", boot_s=1.2)
    genode.layers = [layer(2.5, 10_600_000), layer(2.0, 1_200_000), layer(4.0, 1_300_000)]
    genode.restore = {"compose_s": 0.03, "load_s": 0.07, "total_s": 1.1}
    fiasco = Result("fiasco", "Fiasco.OC", "", error="no Fiasco.OC ticker: put it there")
    table = format_table([genode, fiasco])
    row = next(line for line in table.splitlines() if line.startswith("genode-iso"))
    cells = [cell.strip() for cell in row.split("  ") if cell.strip()]
    # The base layer is apart; the medians are over the two later layers.
    assert cells[3:10] == ["10.6 MB", "2", "3.0 ms", "4.0 ms", "1.25 MB", "0.50 s", "0.10 s"]
    assert "note: fiasco: no Fiasco.OC ticker" in table


def test_lazy_report_says_which_goals_were_met() -> None:
    from pathlib import Path

    from benchmarks.lazy import Run, Setup, report

    fast = Setup("1G", 1024, Path("/nonexistent"), "0001-aaaaaa", 900_000_000, Path("/x"))
    fast.runs = [
        Run("lazy", "1G", process_s=0.6, running_s=0.2, resume_ms=20.0, all_in_s=2.0),
        Run("lazy", "1G", process_s=0.7, running_s=0.22, resume_ms=30.0, all_in_s=2.2),
        Run("full", "1G", process_s=1.9, running_s=1.5, resume_ms=900.0, all_in_s=1.5),
        Run("helper", "1G", process_s=0.2, running_s=0.1, resume_ms=10.0, all_in_s=2.0),
    ]
    slow = Setup("4G", 4096, Path("/nonexistent"), "0001-bbbbbb", 3_700_000_000, Path("/y"))
    slow.runs = [Run("lazy", "4G", process_s=0.3, running_s=0.2, resume_ms=150.0, all_in_s=9.0)]
    text = "\n".join(report([fast, slow]))
    assert "| 1G | 0.84 GiB | lazy | 0.650 s | 0.210 s | 25.0 ms |" in text
    assert "| 1G | 0.84 GiB | full | 1.900 s | 1.500 s | 900.0 ms |" in text
    assert "- 1G lazy: RESUME 25.0 ms after migrate-incoming (goal <= 100 ms): met" in text
    met = "every page in after 2.100 s (goal <= 2.80 s: 900 MB / 500 MB/s + 1 s): met"
    assert f"- 1G lazy: {met}" in text
    assert "- 4G lazy: RESUME 150.0 ms after migrate-incoming (goal <= 100 ms): NOT met" in text
    # The 250 ms goal is the command's, from its exec: the process, not its own timer.
    returned = "the command returned a running guest {} after its exec (goal <= 0.25 s): NOT met"
    assert f"- 1G lazy: {returned.format('0.650 s')}" in text
    assert f"- 4G lazy: {returned.format('0.300 s')}" in text
    assert f"- 1G helper: {returned.format('0.200 s').replace('NOT met', 'met')}" in text
    assert "| 1G | 0.84 GiB | helper | 0.200 s | 0.100 s | 10.0 ms |" in text
    assert not any(line.startswith("- 4G helper") for line in text.splitlines())  # no runs
    assert "- 4G lazy: every page in after 9.000 s (goal <= 8.40 s" in text and "NOT met" in text


# One pause of a disk guest's COLO checkpoint as QEMU 11.1.3 traced it (benchmarks/
# colo_pause_trace.py's events; trimmed: two device sections, events' JSON and one line
# shortened), then a pause cut short.
_TRACE = """\
2026-12-07T03:06:06.722969Z colo_send_message Send 'checkpoint-request' message
2026-12-07T03:06:06.724818Z runstate_set current_run_state 9 (running) new_state 15 (colo)
2026-12-07T03:06:06.725989Z monitor_qmp_respond mon 0x5 resp: {"event": "STOP", ...}
2026-12-07T03:06:06.726004Z monitor_qmp_respond mon 0x6 resp: {"event": "STOP", ...}
2026-12-07T03:06:06.727674Z colo_vm_state_change Change 'run' => 'stop'
2026-12-07T03:06:06.727694Z colo_send_message Send 'vmstate-send' message
2026-12-07T03:06:06.730964Z savevm_section_start apic, section_id 6
2026-12-07T03:06:06.732001Z savevm_section_end apic, section_id 6 -> 0
2026-12-07T03:06:06.736077Z savevm_section_start 0000:00:02.0/virtio-blk, section_id 39
2026-12-07T03:06:06.742442Z savevm_section_end 0000:00:02.0/virtio-blk, section_id 39 -> 0
2026-12-07T03:06:06.742555Z migration_bitmap_sync_start
2026-12-07T03:06:06.743297Z job_state_transition job 0x5 ... transition (undefined-->created)
2026-12-07T03:06:06.743810Z migration_bitmap_sync_end dirty_pages 1349
2026-12-07T03:06:06.743824Z savevm_section_start ram, section_id 1
2026-12-07T03:06:06.761626Z savevm_section_end ram, section_id 1 -> 0
2026-12-07T03:06:06.761690Z colo_send_message Send 'vmstate-size' message
2026-12-07T03:06:06.764654Z colo_receive_message Receive 'vmstate-received' message
2026-12-07T03:06:06.764887Z colo_receive_message Receive 'vmstate-loaded' message
2026-12-07T03:06:06.764914Z monitor_qmp_respond mon 0x5 resp: {"event": "RESUME", ...}
2026-12-07T03:06:06.764934Z runstate_set current_run_state 15 (colo) new_state 9 (running)
2026-12-07T03:06:07.224818Z runstate_set current_run_state 9 (running) new_state 15 (colo)
2026-12-07T03:06:07.225989Z monitor_qmp_respond mon 0x5 resp: {"event": "STOP", ...}
2026-12-07T03:06:07.264934Z runstate_set current_run_state 15 (colo) new_state 9 (running)
"""


def test_a_traced_pause_is_cut_into_its_phases() -> None:
    (pause,) = parse_pauses(_TRACE.splitlines())  # the second pause lacks its phases
    assert abs(pause.marks["stopped"] - 1.171) < 1e-3
    assert abs(pause.phase_ms("drained") - (727.674 - 725.989)) < 1e-3
    assert abs(pause.phase_ms("devices") - (742.555 - 727.674)) < 1e-3
    assert abs(pause.sections["0000:00:02.0/virtio-blk"] - 6.365) < 1e-3
    assert "ram" not in pause.sections
    assert abs(pause.phase_ms("ram_sent") - (761.626 - 743.810)) < 1e-3
    assert abs(pause.phase_ms("acknowledged") - (764.887 - 761.626)) < 1e-3
    assert pause.capture_ms is not None and abs(pause.capture_ms - (743.297 - 724.818)) < 1e-3
    assert abs(pause.total_ms - (764.914 - 724.818)) < 1e-3
    assert abs(sum(pause.phase_ms(key) for key, _ in PHASES) - pause.total_ms) < 1e-6
    table = format_breakdown("fleecing", [pause])
    assert "0000:00:02.0/virtio-blk 6.36" in table
    assert "job created at 18.48 ms (in 1 of 1 pauses)" in table
    assert "no complete pause" in format_breakdown("none", [])
