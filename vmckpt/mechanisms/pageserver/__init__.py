"""The page server: the source of a lazy restore's postcopy migration, one process per restore.

A lazy restore (vmckpt/mechanisms/lazy_restore.py) starts its QEMUs waiting for an incoming
postcopy migration and hands each a socket whose other end belongs to the page server. The
server, for every destination (one, or the N clones of ``restore --clones N``):

- sends the stream's preamble (vmckpt/stream/postcopy.py): the device state first, so the
  guest runs at once;
- answers the destination's page requests from the store, each page checked against its
  digest as it is read (vmckpt/images/pagesource.py); a page is sent to a destination
  exactly once, zero pages only when asked for;
- pushes every other stored page in the background, each chunk read and checked once for
  all destinations (clones share one read of the store);
- ends the stream (``ram`` END, EOF) once QEMU has loaded the device state, and waits for
  the destination to report the migration ``completed``.

It keeps a record per guest in the guest's runtime directory on this host (never in the
store), which ``vmckpt list`` shows as ``restoring (NN %)``, and holds each guest's
checkpoint lock until its pages are all in. If a page does not match its digest the
restore has failed after the guests started: the server ends their QEMUs (by PID) and
records the error, which the foreground ``vmckpt restore`` reports in one line.

Modules, bottom up:

- ``records.py``: the records on this host and what the rest of vmckpt asks of them
  (``restoring (NN %)``, a checkpoint that waits, a failure to report);
- ``destination.py``: one destination, its return path and its sender;
- ``server.py``: :class:`PageServer` (the push read once for all, the watch until each
  destination is done) and :func:`serve`, the body of every page server process;
- ``fork.py``: the first server of a restore, forked by the restore command (its side;
  the command's is vmckpt/mechanisms/pageserver_fork.py, outside this package: light);
- ``recovery.py``: a new server for paused destinations when one died (its guard starts it,
  or ``vmckpt resume``), and the program ``python -m vmckpt.mechanisms.pageserver``.
"""

from vmckpt.mechanisms.pageserver.records import (
    failure_of,
    restoring_state,
    status_of,
    wait_restored,
)

__all__ = [
    "failure_of",
    "restoring_state",
    "status_of",
    "wait_restored",
]
