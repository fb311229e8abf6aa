"""The commands about a guest's life: ``run``, ``console``, ``stop``, ``pause``, ``resume``."""

from __future__ import annotations

import argparse
import sys
import threading

from vmckpt.cli._common import (
    Command,
    follow,
    guest_of,
    open_store,
    parse_duration,
    store_option,
)
from vmckpt.errors import UsageError, VmckptError
from vmckpt.guests.local import LocalGuest
from vmckpt.machine.binary import parse_memory
from vmckpt.machine.bootmedia import kernel_media
from vmckpt.machine.diagnose import REPEATED_RESETS, hint_for
from vmckpt.machine.liveness import Observation
from vmckpt.machine.spec import (
    BootMedium,
    DiskSpec,
    GuestSpec,
    check_cpu,
    check_machine,
    check_name,
    new_generation_id,
)
from vmckpt.mechanisms import api
from vmckpt.mechanisms.watch import stop_on_signals

DEFAULT_HINT_AFTER_S = 5.0  # a guest run in the foreground silent this long gets a hint
HINT_JOIN_S = 3.0


def cmd_run(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    if bool(args.kernel) == bool(args.iso):
        raise UsageError("give either --kernel (with --initrd/--append) or --iso")
    if args.initrd and not args.kernel:
        raise UsageError("--initrd needs --kernel")
    media: list[BootMedium] = []
    if args.kernel:
        media += kernel_media(args.kernel, args.initrd or [])
    if args.iso:
        media.append(BootMedium.of("iso", args.iso))
    qemu_args = tuple(args.qemu_arg or ())
    spec = GuestSpec(
        memory_mib=parse_memory(args.memory),
        cpus=args.cpus,
        accel=args.accel,
        machine=check_machine(args.machine),
        cpu=check_cpu(args.cpu or ""),
        media=tuple(media),
        append=args.append or "",
        qemu_args=qemu_args,
        disks=tuple(DiskSpec.parse(i, text) for i, text in enumerate(args.disk or ())),
        generation_id=new_generation_id(),
        guest_agent=not args.no_guest_agent,
    )
    hint_s = hint_seconds(args.hint_after, detach=args.detach)
    store = open_store(args)
    guest = LocalGuest.start(store, name, spec, extra_args=qemu_args)
    if not args.detach:
        return run_in_foreground(guest, hint_s)
    _say_running(guest)
    if hint_s:
        report_hint(guest, hint_s)
    return 0


def _say_running(guest: LocalGuest) -> None:
    process = guest.process()
    print(
        f"guest {guest.name} running, PID {process.pid}, accel {process.accel}, "
        f"console {process.serial_log}",
        flush=True,
    )


def run_in_foreground(guest: LocalGuest, hint_s: float) -> int:
    """Follow the console of the guest ``run`` just started until the guest ends or SIGINT
    or SIGTERM arrives, then stop the guest (with a hint after ``hint_s``, if not 0).

    The signals only set a flag (watch.stop_on_signals) that the console loop checks: a
    KeyboardInterrupt raised wherever the main thread is could cut the orderly stop short
    and leave the guest running. The handlers also replace an inherited SIG_IGN (a script's
    background job), which would otherwise make the run impossible to end but by SIGKILL,
    with its guest left running. A second signal during the stop (QMP quit, then SIGTERM,
    then SIGKILL: seconds at worst) ends QEMU by its PID at once.
    """
    process = guest.process()
    done = threading.Event()  # the following ended: the hint's watch ends with it
    hinter = threading.Thread(
        target=report_hint, args=(guest, hint_s, done), name="vmckpt-hint", daemon=True
    )
    try:
        with stop_on_signals(notice=None) as stop:
            try:
                _say_running(guest)
                if hint_s:
                    hinter.start()
                follow(guest.console(True, stop=stop))
            finally:
                done.set()
                if hinter.is_alive():
                    # Once done is set it lets go of the guest's monitor within one poll
                    # (liveness.POLL_S) or one QMP command; the stop below needs it.
                    hinter.join(HINT_JOIN_S)
                if process.alive():
                    print(f"\nstopping guest {guest.name}", flush=True)
                    print(api.stop(guest), flush=True)
    except KeyboardInterrupt:
        # A second signal cut the stop short (watch.Interrupted), or the first came before
        # the handlers were in place: no more waiting for QEMU to quit.
        process.kill()
        raise
    return 0


def hint_seconds(text: str | None, *, detach: bool) -> float:
    """--hint-after: given, '0' turns it off; not given, on for a guest run in the foreground
    (whose console the user watches), off with --detach (which returns at once)."""
    if text is None:
        return 0.0 if detach else DEFAULT_HINT_AFTER_S
    if text.strip() in {"0", "0s", "0ms"}:
        return 0.0
    return parse_duration(text)


def report_hint(guest: LocalGuest, seconds: float, done: threading.Event | None = None) -> None:
    """Watch the new guest for ``seconds`` and, if it stays silent or keeps resetting, say on
    stderr what vmckpt can check about why (vmckpt/machine/diagnose.py). Never touches the guest.
    ``done`` (the foreground run ended) ends the watch without a hint."""

    def enough(observation: Observation) -> bool:
        return observation.count("RESET") >= REPEATED_RESETS

    try:
        observation, facts = guest.observe(seconds, until=enough, stop=done)
    except VmckptError:
        return  # the guest went away meanwhile: its own messages say why
    if done is not None and done.is_set():
        return
    hint = hint_for(guest.spec(), observation, facts)
    if hint is not None:
        text = "\n".join(f"vmckpt run: hint: {line}" for line in hint.lines())
        print(f"\n{text}", file=sys.stderr, flush=True)


def cmd_console(args: argparse.Namespace) -> int:
    follow(guest_of(args, open_store(args)).console(args.follow))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    print(api.stop(guest_of(args, open_store(args))))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    api.pause(guest_of(args, open_store(args)))
    print(f"guest {args.name} paused (vmckpt resume {args.name} runs it again)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    recovered = api.resume(guest_of(args, open_store(args)))
    extra = " (a checkpoint interrupted earlier was cleaned up)" if recovered else ""
    print(f"guest {args.name} running{extra}")
    return 0


def add_parsers(command: Command) -> None:
    p = command("run", cmd_run, "start a guest under vmckpt")
    p.add_argument("name", help="the guest's name in the store")
    store_option(p)
    p.add_argument("--create", action="store_true", help="create the store if it does not exist")
    p.add_argument("--kernel", metavar="FILE", help="a Linux or multiboot kernel to boot")
    p.add_argument(
        "--initrd",
        action="append",
        metavar="FILE",
        help="initrd of a Linux kernel; for a multiboot kernel its modules, 'FILE [ARGS],...' "
        "(QEMU's syntax, ',,' is a literal comma; repeatable)",
    )
    p.add_argument("--append", metavar="CMDLINE", help="the kernel command line")
    p.add_argument("--iso", metavar="FILE", help="a bootable ISO image (e.g. GRUB 2) instead")
    p.add_argument("--memory", default="512M", help="guest RAM, e.g. 512M or 1G")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs")
    p.add_argument(
        "--accel",
        default="auto",
        choices=["auto", "kvm", "tcg"],
        help="auto: KVM where it really works, TCG otherwise",
    )
    p.add_argument("--machine", default="pc", help="QEMU machine type, e.g. pc or q35")
    p.add_argument("--cpu", help="QEMU CPU model (and features), e.g. max (default: QEMU's)")
    p.add_argument(
        "--disk",
        action="append",
        metavar="IMAGE[:ro]",
        help="a virtio disk (raw or qcow2; repeatable); writable ones are checkpointed, "
        ":ro ones referenced by content hash",
    )
    p.add_argument(
        "--no-guest-agent",
        action="store_true",
        help="no channel for QEMU's guest agent (by default the guest gets one, through "
        "which a restore steps its clock to now if qemu-ga runs in it)",
    )
    p.add_argument(
        "--qemu-arg",
        action="append",
        metavar="ARG",
        help="an extra QEMU argument (repeatable); reused on restore only from this store's "
        "own layers",
    )
    p.add_argument("--detach", action="store_true", help="return once the guest runs")
    p.add_argument(
        "--hint-after",
        metavar="TIME",
        help="if the guest prints nothing on its console for this long after it starts, or "
        "QEMU reports repeated resets, say so on stderr with the likely causes vmckpt can "
        "check (machine type, CPU model, memory for the image kind); 0: never. Default: "
        f"{DEFAULT_HINT_AFTER_S:.0f}s in the foreground; with --detach only when given "
        "(run then waits that long before it returns)",
    )

    p = command("console", cmd_console, "show a guest's serial console")
    p.add_argument("name", help="the guest")
    store_option(p)
    p.add_argument("--follow", "-f", action="store_true", help="keep showing new output")

    p = command("stop", cmd_stop, "end a guest vmckpt started")
    p.add_argument("name", help="the guest")
    store_option(p)

    p = command("pause", cmd_pause, "pause a guest (QMP stop)")
    p.add_argument("name", help="the guest")
    store_option(p)

    p = command("resume", cmd_resume, "run a paused guest (and clean up an interrupted checkpoint)")
    p.add_argument("name", help="the guest")
    store_option(p)
