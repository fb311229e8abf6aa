"""``python -m vmckpt.mechanisms.pageserver resume``: a page server that recovers a lazy
restore (vmckpt/mechanisms/pageserver/recovery.py; its guard is
vmckpt/mechanisms/pageserver_guard.py)."""

import sys

from vmckpt.mechanisms.pageserver.recovery import main

sys.exit(main())
