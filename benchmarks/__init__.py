"""Benchmarks: tables and plots of what vmckpt costs (README: Measured on this machine).

Their stores are throw-away: unless VMCKPT_KEYS_DIR says otherwise, their keys go to a
directory of their own under /tmp (removed at exit if no store was made), not to the
user's ~/.config/vmckpt/keys. So does what this host keeps for their stores (unless
VMCKPT_DATA_DIR says otherwise): precopy-diff's copy of a guest's RAM, restored disks;
gigabytes per run, removed at exit (a store's data directory outlives the store itself).
And so does this host's runtime side of their guests (unless VMCKPT_RUNTIME_DIR says
otherwise): records, sockets and logs under /run/vmckpt would outlive the stores.
"""

import atexit
import contextlib
import os
import shutil
import tempfile

if "VMCKPT_KEYS_DIR" not in os.environ:
    _keys = tempfile.mkdtemp(prefix="vmckpt-bench-keys-")
    os.environ["VMCKPT_KEYS_DIR"] = _keys

    def _remove_if_unused(path: str = _keys) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty: kept stores stay readable

    atexit.register(_remove_if_unused)

if "VMCKPT_DATA_DIR" not in os.environ:
    _data = tempfile.mkdtemp(prefix="vmckpt-bench-data-")
    os.environ["VMCKPT_DATA_DIR"] = _data
    atexit.register(shutil.rmtree, _data, True)

if "VMCKPT_RUNTIME_DIR" not in os.environ:
    # Short: QEMU's sockets live in it (a Unix socket path holds 108 bytes).
    _runtime = tempfile.mkdtemp(prefix="vk-bench-run-", dir="/tmp")
    os.environ["VMCKPT_RUNTIME_DIR"] = _runtime
    atexit.register(shutil.rmtree, _runtime, True)
