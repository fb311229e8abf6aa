"""Benchmarks: tables and plots of what vmckpt costs (README: Measured on this machine).

Their stores are throw-away: unless VMCKPT_KEYS_DIR says otherwise, their keys go to a
directory of their own under /tmp, not to the user's ~/.config/vmckpt/keys.
"""

import os
import tempfile

if "VMCKPT_KEYS_DIR" not in os.environ:
    os.environ["VMCKPT_KEYS_DIR"] = tempfile.mkdtemp(prefix="vmckpt-bench-keys-")
