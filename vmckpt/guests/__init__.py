"""How to reach a guest (no checkpoint mechanism here: vmckpt/mechanisms/): a QEMU vmckpt
started on this host (local.py), a running libvirt domain (libvirt.py), a guest vmckpt runs
on another host (remote.py), all behind the interface of base.py."""

from __future__ import annotations

from vmckpt.errors import UsageError
from vmckpt.guests.base import Guest, GuestStatus
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store
from vmckpt.machine.spec import check_name

__all__ = ["Guest", "GuestStatus", "LocalGuest", "open_guest"]


def open_guest(
    store: Store, name: str | None = None, *, libvirt: str | None = None, uri: str | None = None
) -> Guest:
    """The guest a command names: a libvirt domain (``libvirt``), a guest recorded as
    running on another host, or one vmckpt runs here. (The other kinds are imported here:
    a command that reaches no such guest does not load them.)"""
    from vmckpt.guests.libvirt import LibvirtGuest
    from vmckpt.guests.remote import RemoteGuest

    if libvirt is not None:
        return LibvirtGuest(store, libvirt, uri)
    if name is None:
        raise UsageError("name a guest (or --libvirt DOMAIN)")
    check_name(name)
    remote = RemoteGuest.load(store, name)
    if remote is not None:
        return remote
    return LocalGuest(store, name)
