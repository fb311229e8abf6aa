"""Live migration of a running guest between this host and another (either way).

Mechanism ``qemu`` (the default): the destination's agent starts QEMU from
the guest's spec with ``-incoming defer`` listening on tcp; the source's
agent has the source QEMU ``migrate`` there directly — QEMU's own pre-copy,
so the guest runs while its memory moves and stops only for the last
iteration. The destination's agent resumes the guest the moment it arrived
and reports it running; only then is the source QEMU ended.

Both agents take orders from this orchestrator on stdin (``commit``, ``abort``,
``ping`` every second). Until the destination has confirmed and committed:

- any failure (QEMU's migration failing or stalling, the destination's QEMU
  not starting, an agent's error, an agent silent for ``heartbeat_s``) makes
  the orchestrator send ``abort`` to both: the source cancels and resumes,
  the destination kills the QEMU it started;
- an agent that hears nothing from the orchestrator for ``heartbeat_s`` (a
  cut connection) does the same on its own side.

The one window not covered: the destination committed (its guest runs) and
the connection to the source is lost before the source heard ``commit``; the
source then resumes too. The window is one round trip long.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from vmckpt.errors import RemoteError, UsageError, VmckptError
from vmckpt.guests.local import LocalGuest
from vmckpt.guests.remote import RemoteTarget, forget_remote, load_remote_target, save_remote_record
from vmckpt.images import Store
from vmckpt.machine.spec import GuestSpec
from vmckpt.mechanisms.colo import end_session
from vmckpt.mechanisms.precopy import take_checkpoint
from vmckpt.mechanisms.remote import ship_layers, ship_media
from vmckpt.remote.endpoint import Endpoint, Session, failure_of, parse_line, remote_failure
from vmckpt.remote.ssh import SshHost


@dataclass(frozen=True)
class MigrateSettings:
    bandwidth: int = 0  # bytes/s for QEMU's max-bandwidth; 0 leaves QEMU's default
    downtime_limit_ms: int = 50
    stall_s: float = 10.0  # source: no bytes sent for this long fails the migration
    heartbeat_s: float = 10.0  # either side: silence for this long counts as a cut
    listen: str | None = None  # destination address for QEMU's tcp stream
    timeout_s: float = 900.0


@dataclass(frozen=True)
class MigrateResult:
    name: str
    source: str
    destination: str
    mechanism: str
    downtime_ms: float | None  # source QEMU's STOP to destination QEMU's RESUME (host clocks)
    qemu_downtime_ms: int | None  # QEMU's own figure (source side)
    total_s: float  # command start to destination committed
    migrate_s: float  # QEMU's migration alone
    bytes_sent: int
    dest_pid: int
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "name": self.name,
            "source": self.source,
            "destination": self.destination,
            "mechanism": self.mechanism,
            "downtime_ms": None if self.downtime_ms is None else round(self.downtime_ms, 1),
            "qemu_downtime_ms": self.qemu_downtime_ms,
            "total_s": round(self.total_s, 3),
            "migrate_s": round(self.migrate_s, 3),
            "bytes_sent": self.bytes_sent,
            "dest_pid": self.dest_pid,
        }
        data.update(self.extra)
        return data


class _Pinger(threading.Thread):
    def __init__(self, sessions: list[Session]) -> None:
        super().__init__(daemon=True, name="vmckpt-pinger")
        self.sessions = sessions
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(1.0):
            for session in self.sessions:
                session.send_line("ping")


class _Side:
    """One agent session and what it said."""

    def __init__(self, role: str, host: str, session: Session) -> None:
        self.role = role
        self.host = host
        self.session = session
        self.last_seen = time.monotonic()
        self.events: dict[str, dict[str, Any]] = {}
        self.ended = False

    def pump(self, timeout: float) -> None:
        """Read what arrived; raise RemoteError for an agent's error or its end."""
        while True:
            try:
                line = self.session.read_line(timeout)
            except TimeoutError:
                return
            timeout = 0.0
            self.last_seen = time.monotonic()
            if line is None:
                self.ended = True
                raise RemoteError(
                    f"the {self.role} agent ended unexpectedly: {_tail(self.session.stderr())}",
                    host=self.host,
                    step=self.role,
                )
            data = parse_line(line)
            if data is None:
                continue
            if "error" in data:
                self.ended = True
                raise remote_failure(data, self.host, self.role)
            if "event" in data:
                self.events[str(data["event"])] = data

    def check_alive(self, heartbeat_s: float) -> None:
        if time.monotonic() - self.last_seen > heartbeat_s:
            raise RemoteError(
                f"no word from the {self.role} side for {heartbeat_s:.0f} s (connection cut?)",
                host=self.host,
                step=self.role,
            )

    def wait_for(self, event: str, timeout: float, heartbeat_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while event not in self.events:
            if time.monotonic() > deadline:
                raise RemoteError(
                    f"the {self.role} side did not report {event} within {timeout:.0f} s",
                    host=self.host,
                    step=self.role,
                )
            self.pump(0.1)
            self.check_alive(heartbeat_s)
        return self.events[event]


def _tail(text: str) -> str:
    lines = text.strip().splitlines()
    return " | ".join(lines[-2:]) if lines else "no output"


def _tcp_uri(host: str, port: int) -> str:
    return f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"


def migrate_guest(
    store: Store,
    name: str,
    to: RemoteTarget | None,
    settings: MigrateSettings | None = None,
) -> MigrateResult:
    """Live-migrate guest ``name`` to ``to`` (None: to this host, from where it runs now)."""
    settings = settings or MigrateSettings()
    started = time.monotonic()
    now_at = load_remote_target(store, name)
    if now_at is None and to is None:
        raise UsageError(f"guest {name} runs on this host already")
    if now_at is not None and to is not None and now_at.address == to.address:
        raise UsageError(f"guest {name} runs on {to.address} already")
    connections: list[SshHost] = []
    try:
        if now_at is None:
            source = Endpoint(str(store.path))
        else:
            ssh, source = now_at.connect()
            connections.append(ssh)
        if to is None:
            dest = Endpoint(str(store.path))
        else:
            ssh, dest = to.connect()
            connections.append(ssh)
        listen = settings.listen
        if listen is None:
            if dest.ssh is not None:
                listen = dest.ssh.peer_address
            else:
                assert source.ssh is not None
                listen = source.ssh.local_address
        result = _migrate(name, source, dest, listen, settings, started)
    finally:
        for ssh in connections:
            ssh.close()
    if to is None:
        forget_remote(store, name)
    else:
        save_remote_record(store, name, to)
    return result


def _migrate(
    name: str,
    source: Endpoint,
    dest: Endpoint,
    listen: str,
    settings: MigrateSettings,
    started: float,
) -> MigrateResult:
    described = source.call("describe", "--name", name, timeout=60)
    if described.get("state") != "running":
        raise RemoteError(
            f"the guest is {described.get('state')}, not running", host=source.host, vm=name,
            step="describe",
        )  # fmt: skip
    prepared = dest.call("prepare", timeout=60)
    if dest.ssh is not None:
        ship_media(GuestSpec.from_dict(described["spec"]), dest, name)
    head = described.get("head")
    head_args = ["--head", str(head)] if head and head in prepared.get("layers", {}) else []
    # Free-form QEMU arguments travel only from this host's own records to another host,
    # never from another host to this one (docs/SECURITY.md).
    trusted = described.get("trusted_args", []) if source.ssh is None else []

    dst = _Side(
        "destination",
        dest.host,
        dest.open(
            "receive", "--name", name, "--spec", json.dumps(described["spec"]),
            "--machine-type", str(described["machine_type"]), "--listen", listen,
            "--heartbeat", str(settings.heartbeat_s), "--trusted-args", json.dumps(trusted),
            *head_args,
        ),
    )  # fmt: skip
    src: _Side | None = None
    pinger = _Pinger([dst.session])
    pinger.start()
    committed = False
    try:
        listening = dst.wait_for("listening", 120, settings.heartbeat_s)
        uri = _tcp_uri(listen, int(listening["port"]))
        src = _Side(
            "source",
            source.host,
            source.open(
                "send", "--name", name, "--uri", uri,
                "--bandwidth", str(settings.bandwidth),
                "--downtime-limit", str(settings.downtime_limit_ms),
                "--stall", str(settings.stall_s), "--heartbeat", str(settings.heartbeat_s),
            ),
        )  # fmt: skip
        pinger.sessions.append(src.session)
        deadline = time.monotonic() + settings.timeout_s
        while "completed" not in src.events or "running" not in dst.events:
            if time.monotonic() > deadline:
                raise RemoteError(
                    f"the migration did not finish within {settings.timeout_s:.0f} s",
                    vm=name,
                    step="migrate",
                )
            src.pump(0.05)
            dst.pump(0.05)
            src.check_alive(settings.heartbeat_s)
            dst.check_alive(settings.heartbeat_s)
        # The guest runs at the destination: make it final there, then end the source.
        dst.session.send_line("commit")
        done = dst.wait_for("committed", settings.heartbeat_s * 2, settings.heartbeat_s)
        committed = True
        src.session.send_line("commit")
        src.wait_for("done", 60, settings.heartbeat_s)
    except BaseException as exc:
        pinger.stopped.set()
        if committed:
            # The guest runs at the destination; the source may still hold a paused copy.
            raise RemoteError(
                f"the guest runs on {dest.host}, but ending it on {source.host} failed: {exc}",
                vm=name,
                step="end-source",
            ) from exc
        where = _abort(name, src, dst)
        if isinstance(exc, VmckptError):
            raise RemoteError(f"{exc.one_line()}; {where}", vm=name, step="migrate") from exc
        raise
    finally:
        pinger.stopped.set()
        for side in (src, dst):
            if side is not None:
                side.session.close()
    completed = src.events["completed"]
    running = dst.events["running"]
    stop_ts = completed.get("stop_ts")
    downtime = (float(running["resume_ts"]) - float(stop_ts)) * 1000 if stop_ts else None
    return MigrateResult(
        name=name,
        source=source.host,
        destination=dest.host,
        mechanism="qemu",
        downtime_ms=downtime,
        qemu_downtime_ms=completed.get("downtime_ms"),
        total_s=time.monotonic() - started,
        migrate_s=float(completed.get("elapsed_s") or 0.0),
        bytes_sent=int(completed.get("transferred") or 0),
        dest_pid=int(done.get("pid") or 0),
    )


def _abort(name: str, src: _Side | None, dst: _Side) -> str:
    """Tell both sides to abort; say where the guest runs now."""
    dst.session.send_line("abort")
    if src is None:
        return "the guest runs on at the source, untouched"
    src.session.send_line("abort")
    deadline = time.monotonic() + 30
    while "resumed" not in src.events and not src.ended and time.monotonic() < deadline:
        try:
            src.pump(0.2)
        except RemoteError:
            break
    resumed = src.events.get("resumed")
    if resumed is not None and resumed.get("running"):
        return f"the guest runs on at {src.host}"
    return f"could not confirm that the guest runs on at {src.host}"


def migrate_by_layers(
    store: Store, name: str, to: RemoteTarget, settings: MigrateSettings | None = None
) -> MigrateResult:
    """Mechanism ``layers``: move the guest as vmckpt layers; send only what ``to`` lacks.

    1. While the guest runs: a checkpoint (a delta against the guest's head, if
       it has one), and the layers of its chain that the destination lacks.
    2. Stop the guest; a second checkpoint holds only what changed meanwhile;
       copy that one layer; restore it there (compose the chain, load, resume).
    3. Only once the restore there reports the guest running does the QEMU here
       end; any failure before resumes the guest here and leaves no QEMU there.

    The pause is step 2 whole: a full pass over RAM into vmckpt's receiver,
    the diff, the copy and the restore there. It is seconds, not QEMU's
    milliseconds; what it saves is bytes on the wire when the destination
    already holds most of the chain.
    """
    started = time.monotonic()
    guest = LocalGuest(store, name)
    process = guest.process()
    end_session(guest.store, guest.name)  # the layers are precopy-diff ones
    ssh, dest = to.connect()
    with ssh:
        first = take_checkpoint(guest)
        pre = ship_layers(store, store.chain(first.layer.id), dest)
        ship_media(guest.spec(), dest, name)
        precopied = time.monotonic()
        with process.monitor() as mon:
            mon.stop()
        stopped = time.monotonic()
        restored_there = False
        try:
            final = take_checkpoint(guest)
            last = ship_layers(store, store.chain(final.layer.id), dest)
            # The guest's own QEMU arguments, which this host trusts, said on the command
            # line there: the layers' copies are not used by the other host.
            own_args = [f"--qemu-arg={arg}" for arg in guest.record.trusted_args]
            code, out, err = dest.vmckpt(
                "restore", "--store", to.store, "--layer", final.layer.id, "--name", name,
                "--detach", "--json", *own_args,
            )  # fmt: skip
            if code != 0:
                raise failure_of(err, ssh.name, "restore")
            restored_there = True
            resumed = time.monotonic()
            pid = int(json.loads(out)["pid"])
        except BaseException:
            guest.resume()
            if restored_there:
                dest.vmckpt("stop", name, "--store", to.store)
            raise
    process.shutdown()
    guest.record.process = None
    guest.save()
    save_remote_record(store, name, to)
    return MigrateResult(
        name=name,
        source="local",
        destination=str(to.address),
        mechanism="layers",
        downtime_ms=(resumed - stopped) * 1000,
        qemu_downtime_ms=None,
        total_s=time.monotonic() - started,
        migrate_s=resumed - started,
        bytes_sent=pre.bytes_sent + last.bytes_sent,
        dest_pid=pid,
        extra={
            "layers_copied": pre.copied + last.copied,
            "layers_reused": pre.reused,
            "precopy_s": round(precopied - started, 3),
            "precopy_bytes": pre.bytes_sent,
            "final_bytes": last.bytes_sent,
        },
    )
