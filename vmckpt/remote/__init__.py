"""Other hosts over SSH (paramiko): copy layers, restore there, live-migrate, relay commands."""

from vmckpt.remote.migrate import MigrateResult, MigrateSettings, migrate_guest
from vmckpt.remote.ops import (
    DEFAULT_REMOTE_STORE,
    RemoteRecord,
    RemoteRestoreResult,
    RemoteTarget,
    relay,
    remote_names,
    remote_status,
    restore_remote,
)
from vmckpt.remote.ssh import DEFAULT_KNOWN_HOSTS, HostAddress, SshOptions

__all__ = [
    "DEFAULT_KNOWN_HOSTS",
    "DEFAULT_REMOTE_STORE",
    "HostAddress",
    "MigrateResult",
    "MigrateSettings",
    "RemoteRecord",
    "RemoteRestoreResult",
    "RemoteTarget",
    "SshOptions",
    "migrate_guest",
    "relay",
    "remote_names",
    "remote_status",
    "restore_remote",
]
