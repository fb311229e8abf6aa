"""The mission's guests: Genode (base-hw, from its GRUB ISO and as a multiboot pair) and
Fiasco.OC with L4Re, checkpointed and restored with every mechanism the installed QEMUs run.

zdtm-style, like the Linux guest's tests: each system prints a deterministic
tick line every 200 ms (tick n has the same checksum on every boot), so a
restored system must continue at the tick after its checkpoint and print, for
every tick, the checksums every other run printed (tests/framework/microkernel.py
keeps one ledger of all runs of a test, plus Genode's shipped reference run).
Per system and mechanism: three checkpoints; the middle and the last layer
restored side by side; the restored middle one checkpointed again, and that
layer restored too. The layers record the machine type and CPU model the
system needs (``--machine q35 --cpu max`` for Genode), and restore uses them.

The images come from guest/ (tests/framework/microkernel.py says
how to point elsewhere); a missing image fails the test, saying where to put it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tests.framework.guest import Vmckpt
from tests.framework.mechanisms import MECHANISMS, Mechanism
from tests.framework.microkernel import (
    SYSTEMS,
    System,
    TickLedger,
    check_continuation,
    console,
    last_tick,
    require,
    run_system,
    wait_ticks,
)

RESTORED_TICKS = 10  # ticks each restored run must print (2 s of guest time)


def system(name: str) -> System:
    found = SYSTEMS[name]
    require(found.media_args)
    return found


@dataclass(frozen=True)
class Layer:
    id: str
    before: int  # last tick printed before the checkpoint began
    after: int  # last tick printed once it returned
    row: dict[str, object]


def checkpoint(runner: Vmckpt, sys_: System, name: str, mechanism: Mechanism) -> Layer:
    before = last_tick(runner, sys_, name)
    row = mechanism.checkpoint(runner, name)
    after = last_tick(runner, sys_, name)
    return Layer(str(row["layer"]), before, after, row)


def restore(runner: Vmckpt, layer: str, name: str) -> None:
    runner.restore("--layer", layer, "--name", name)


def check_layer_spec(runner: Vmckpt, sys_: System, layer: str, mechanism: Mechanism) -> None:
    """The layer records the machine and CPU the system was run with, and the QEMU used."""
    data = json.loads(runner("inspect", "--store", str(runner.store), layer, "--json").stdout)
    assert data["spec"]["machine"] == sys_.machine, data["spec"]
    assert data["spec"]["cpu"] == sys_.cpu, data["spec"]
    family = "pc-q35-" if sys_.machine == "q35" else "pc-i440fx-"
    assert data["machine_type"].startswith(family), data["machine_type"]
    assert data["qemu_version"].split(".")[0] == str(mechanism.qemu_major), data["qemu_version"]


def check_restored_command(runner: Vmckpt, sys_: System, name: str, machine_type: str) -> None:
    """The restored QEMU was started with the layer's exact machine type and the CPU model."""
    process = runner.guest(name).record.process
    assert process is not None
    command = process.command
    assert command[command.index("-machine") + 1] == machine_type, command
    if sys_.cpu:
        assert command[command.index("-cpu") + 1] == sys_.cpu, command
    else:
        assert "-cpu" not in command, command


def chain_restore_and_recheckpoint(runner: Vmckpt, sys_: System, mechanism: Mechanism) -> None:
    store = str(runner.store)
    run_system(runner, sys_, "orig")
    wait_ticks(runner, sys_, "orig", 3)
    layers: list[Layer] = []
    for _ in range(3):
        layers.append(checkpoint(runner, sys_, "orig", mechanism))
        wait_ticks(runner, sys_, "orig", len(sys_.ticks(console(runner, "orig"))) + 3)
    assert [layer.row["parent"] for layer in layers] == [None, layers[0].id, layers[1].id]
    # Later layers hold only what changed: far less than the base layer.
    assert all(
        int(str(layer.row["bytes"])) < int(str(layers[0].row["bytes"])) for layer in layers[1:]
    )
    runner("stop", "orig", "--store", store)

    ledger = TickLedger(sys_.reference_ticks())
    original = sys_.ticks(console(runner, "orig"))
    assert [t.n for t in original] == list(range(original[0].n, original[-1].n + 1))
    assert all(t.ok for t in original), "the original run reported MISMATCH"
    ledger.add("the original run", original)
    for layer in layers:
        check_layer_spec(runner, sys_, layer.id, mechanism)
    machine_type = json.loads(runner("inspect", "--store", store, layers[1].id, "--json").stdout)[
        "machine_type"
    ]

    # The middle and the last layer, restored side by side.
    restore(runner, layers[1].id, "middle")
    restore(runner, layers[2].id, "last")
    check_restored_command(runner, sys_, "middle", machine_type)
    for name, layer in (("middle", layers[1]), ("last", layers[2])):
        wait_ticks(runner, sys_, name, RESTORED_TICKS)
        check_continuation(
            sys_, console(runner, name), ledger, source=f"restored {name} layer",
            after=(layer.before, layer.after),
        )  # fmt: skip

    # The restored guest is checkpointed again; that layer restores too.
    again = checkpoint(runner, sys_, "middle", mechanism)
    assert again.row["parent"] == layers[1].id, again.row
    wait_ticks(runner, sys_, "middle", len(sys_.ticks(console(runner, "middle"))) + 3)
    ledger.add("the restored middle layer", sys_.ticks(console(runner, "middle")))
    ledger.add("the restored last layer", sys_.ticks(console(runner, "last")))
    runner("stop", "middle", "--store", store)
    runner("stop", "last", "--store", store)
    restore(runner, again.id, "again")
    wait_ticks(runner, sys_, "again", RESTORED_TICKS)
    check_continuation(
        sys_, console(runner, "again"), ledger, source="the layer of the restored guest",
        after=(again.before, again.after),
    )  # fmt: skip
    runner("stop", "again", "--store", store)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_genode_iso_chain_restores_continue_every_tick(
    microkernel_runner: Vmckpt, mechanism: Mechanism
) -> None:
    chain_restore_and_recheckpoint(microkernel_runner, system("genode-iso"), mechanism)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_genode_multiboot_chain_restores_continue_every_tick(
    microkernel_runner: Vmckpt, mechanism: Mechanism
) -> None:
    chain_restore_and_recheckpoint(microkernel_runner, system("genode-multiboot"), mechanism)


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_fiasco_ticker_chain_restores_continue_every_tick(
    microkernel_runner: Vmckpt, mechanism: Mechanism
) -> None:
    chain_restore_and_recheckpoint(microkernel_runner, system("fiasco"), mechanism)
