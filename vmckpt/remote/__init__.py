"""Other hosts over SSH (paramiko): copy layers, restore there, live-migrate, relay commands."""

from vmckpt.remote.migrate import MigrateResult, MigrateSettings, migrate_by_layers, migrate_guest
from vmckpt.remote.ops import (
    DEFAULT_REMOTE_STORE,
    RemoteGuest,
    RemoteRestoreResult,
    RemoteTarget,
    remote_names,
    restore_remote,
)
from vmckpt.remote.ssh import DEFAULT_KNOWN_HOSTS, HostAddress, SshOptions

__all__ = [
    "DEFAULT_KNOWN_HOSTS",
    "DEFAULT_REMOTE_STORE",
    "HostAddress",
    "MigrateResult",
    "MigrateSettings",
    "RemoteGuest",
    "RemoteRestoreResult",
    "RemoteTarget",
    "SshOptions",
    "migrate_by_layers",
    "migrate_guest",
    "remote_names",
    "restore_remote",
]
