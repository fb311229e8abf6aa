"""Checkpoint mechanisms and what is done with layers, above the guests (vmckpt/guests/):
which mechanism a guest gets (choice.py), precopy-diff (precopy.py), the COLO checkpoint
session (colo.py), writable disks at the checkpoint instant (disk_capture.py) and at restore
(disk_restore.py), the one layer writer (layers.py), the one watch loop (watch.py), restores
(restore.py, restore_libvirt.py), other hosts (remote.py, migrate.py), what this host's QEMU
supports (check.py), and the commands' front to all of it (api.py)."""
