"""numpy, imported when vmckpt first uses it, not when a module that uses it is imported.

Importing numpy takes ~50 ms, a fifth of a command's start, and many commands never use
it: a lazy restore's command does not (its page server, forked from it, does). Modules
write ``from vmckpt.lazy_numpy import np`` where they would write ``import numpy as np``,
keep ``numpy.typing`` for annotations (under ``TYPE_CHECKING``), and touch ``np`` at no
module's top level (tests/test_cli.py checks that importing the CLI loads no numpy).

``np`` is a module whose attribute lookups import numpy on the first miss and then hold
numpy's names themselves, so later lookups cost what numpy's own do. Not the standard
library's ``LazyLoader``: Python 3.11 reads a module's ``__spec__`` on every ``import`` of
it, which loads a lazy module at once, and its first load is not safe between threads.
"""

from __future__ import annotations

import importlib
import os
import types
from typing import TYPE_CHECKING, Any

__all__ = ["np"]

if TYPE_CHECKING:
    import numpy as np
else:
    np = types.ModuleType("numpy", "numpy, loaded on first use (vmckpt.lazy_numpy)")

    def _first_use(name: str) -> Any:
        # import_module holds the import system's lock: threads that get here together
        # load numpy once. The names are then numpy's (numpy's own __getattr__ included,
        # for the attributes numpy itself loads lazily).
        # vmckpt sorts, compares and indexes arrays; it never calls BLAS. OpenBLAS starts a
        # thread per CPU as numpy loads, and on 2 CPUs that costs a lazy restore's page
        # server ~75 ms of CPU beside its QEMU and command (OPENBLAS_NUM_THREADS set outside
        # is kept).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        numpy = importlib.import_module("numpy")
        for key, value in vars(numpy).items():
            if not (key.startswith("__") and key != "__getattr__"):
                setattr(np, key, value)
        np.__version__ = numpy.__version__
        return getattr(numpy, name)

    np.__getattr__ = _first_use
