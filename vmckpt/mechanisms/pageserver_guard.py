"""``python -m vmckpt.mechanisms.pageserver_guard --pipe FD --store S --layer L --guest G…``:
the guard of a page server (vmckpt/mechanisms/pageserver/), spawned by the server.

It waits on its pipe having imported nothing of vmckpt but the pipe's reader: it starts
while a lazy restore's QEMUs start, and the whole of vmckpt's imports (~0.25 s of CPU)
there slowed every QEMU's start. Only if the server dies without a release does it import
the recovery (vmckpt/mechanisms/pageserver/recovery.py) and start a new server. Outside the
``pageserver`` package, whose ``__init__`` imports it all.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from vmckpt.guard import wait_for_parent

MODULE = "vmckpt.mechanisms.pageserver_guard"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("--pipe", type=int, required=True)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--layer", required=True)
    parser.add_argument("--guest", action="append", required=True)
    # NAME=FD: the server's monitor connection to NAME's QEMU, held here (and handed to the
    # new server) so that a recovery needs no new one (pageserver/server.py: monitor_of).
    parser.add_argument("--monitor", action="append", default=[])
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when its server says so, or dies
    if wait_for_parent(args.pipe):
        return 0
    from vmckpt.mechanisms.pageserver.recovery import recover_for_guard
    from vmckpt.mechanisms.pageserver.server import parse_monitors

    return recover_for_guard(args.store, args.layer, args.guest, parse_monitors(args.monitor))


if __name__ == "__main__":
    sys.exit(main())
