"""Benchmarks: tables and plots of what vmckpt costs (README: Measured on this machine).

Their stores are throw-away: unless VMCKPT_KEYS_DIR says otherwise, their keys go to a
directory of their own under /tmp (removed at exit if no store was made), not to the
user's ~/.config/vmckpt/keys.
"""

import atexit
import contextlib
import os
import tempfile

if "VMCKPT_KEYS_DIR" not in os.environ:
    _keys = tempfile.mkdtemp(prefix="vmckpt-bench-keys-")
    os.environ["VMCKPT_KEYS_DIR"] = _keys

    def _remove_if_unused(path: str = _keys) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # only if empty: kept stores stay readable

    atexit.register(_remove_if_unused)
