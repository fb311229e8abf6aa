"""``python -m vmckpt.mechanisms.pageserver``: a page server that recovers a lazy restore
(``resume``), or the guard of one (``--pipe FD``): vmckpt/mechanisms/pageserver/recovery.py."""

import sys

from vmckpt.mechanisms.pageserver.recovery import main

sys.exit(main())
