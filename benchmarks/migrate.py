"""Run the migration benchmark against a throw-away "other host" (a network namespace).

    sudo python3 -m benchmarks.migrate [--memory 256 1024] [--pages 0 100] [--json FILE]

Needs root (network namespace, sshd) and the test guest (make -C guest, or
--kernel/--initrd). Prints a table; with --json writes the rows too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.migrate_lib import format_rows, run_migration_bench
from tests.framework.netns import other_host
from vmckpt.guests.remote import RemoteTarget
from vmckpt.remote.ssh import HostAddress, SshOptions

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--memory", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--pages", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--kernel", default=str(REPO / "guest/build/vmlinuz"))
    parser.add_argument("--initrd", default=str(REPO / "guest/build/initrd.img"))
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    with other_host() as host:
        target = RemoteTarget(
            address=HostAddress.parse(host.target),
            store=str(host.scratch / "remote"),
            python=f"env PYTHONPATH={REPO} {sys.executable}",
            ssh=SshOptions(identity=str(host.key), known_hosts=str(host.known_hosts)),
        )
        rows = run_migration_bench(
            target,
            kernel=Path(args.kernel),
            initrd=Path(args.initrd),
            memories_mib=tuple(args.memory),
            pages_per_step=tuple(args.pages),
            scratch=host.scratch / "bench",
        )
    print(format_rows(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
