"""What the state directory (`.gitfaas/` by default) knows about the processes of `gitfaas up`.

- `up.lock`: held with `flock` by the running `gitfaas up`, so there is one per state directory.
  The kernel drops the lock when its holder dies, even by SIGKILL, and the descriptor is not
  inherited by children (nats-server, Jobs), so a dead holder never blocks the next start.
- `up.json`: that `gitfaas up`'s pid, bridge port and NATS URL. CLI commands read the NATS URL
  here when `NATS_URL` is not set; a second `gitfaas up` names the first from it.
- `processes/<pid>.json`: each process gitfaas started that would outlive it if gitfaas were
  killed (the embedded nats-server, each local Job's process group), with the pid of its owner.
  The next `gitfaas up` stops those whose owner is gone (`stop_orphans`).

A recorded pid is only ever signalled after checking it is still that process: its identity (boot
id and start time from `/proc`, else `ps`'s start time and command) must be the recorded one, so a
pid the system has since given to an unrelated process is left alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = "up.lock"
UP_FILE = "up.json"
PROCESSES_DIR = "processes"
STOP_GRACE_SECONDS = 5.0

_PROC = Path("/proc")


# ---- process identity --------------------------------------------------------------------------

def _boot_id() -> str:
    with contextlib.suppress(OSError):
        return (_PROC / "sys/kernel/random/boot_id").read_text().strip()
    return ""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start time in clock ticks since boot) from /proc/<pid>/stat."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
        fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces and ')'
        return fields[0], int(fields[2]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _has_proc() -> bool:
    return (_PROC / "self" / "stat").exists()


def process_identity(pid: int) -> str | None:
    """What tells this process apart from a later one given the same pid; None when it is gone.

    A zombie (exited, not yet reaped) counts as gone: it runs nothing and cannot be stopped.
    """
    if pid <= 0:
        return None
    if _has_proc():
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X", "x"):
            return None
        return f"{_boot_id()}/{stat[2]}"
    try:  # no /proc (macOS): ps's start time (to the second) and command line
        out = subprocess.run(["ps", "-o", "stat=", "-o", "lstart=", "-o", "command=", "-p", str(pid)],
                             capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out or out.startswith("Z"):
        return None
    return "ps/" + out.split(None, 1)[1]


def is_alive(pid: int, identity: str | None) -> bool:
    """Is the process recorded as (pid, identity) still running?"""
    return identity is not None and process_identity(pid) == identity


# ---- records of started processes ---------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ProcessRecord:
    pid: int
    identity: str
    what: str  # for people: "nats-server", "Job collect-x1y2z"
    owner_pid: int
    owner_identity: str | None
    group: bool = False  # the pid leads a process group, and the whole group is stopped
    env_marker: str | None = None  # NAME=value every member of the group has in its environment


_own: tuple[int, str | None] | None = None


def own_identity() -> tuple[int, str | None]:
    """(pid, identity) of this process, computed once per process."""
    global _own
    if _own is None or _own[0] != os.getpid():
        _own = (os.getpid(), process_identity(os.getpid()))
    return _own


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(json.dumps(data))
    os.replace(partial, path)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class ProcessRecords:
    """`<state_dir>/processes/`: one file per started process that could outlive gitfaas."""

    def __init__(self, state_dir: Path | str) -> None:
        self.directory = Path(state_dir).expanduser().absolute() / PROCESSES_DIR

    def add(self, pid: int, what: str, *, group: bool = False, env_marker: str | None = None) -> None:
        """Record `pid` (just started by this process); nothing is recorded if it is already gone."""
        identity = process_identity(pid)
        if identity is None:
            return
        owner_pid, owner_identity = own_identity()
        record = ProcessRecord(pid=pid, identity=identity, what=what, owner_pid=owner_pid,
                               owner_identity=owner_identity, group=group, env_marker=env_marker)
        _write_json(self.directory / f"{pid}.json", asdict(record))

    def remove(self, pid: int) -> None:
        with contextlib.suppress(OSError):
            (self.directory / f"{pid}.json").unlink()

    def records(self) -> list[ProcessRecord]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            data = _read_json(path)
            try:
                found.append(ProcessRecord(**data))  # type: ignore[arg-type]
            except TypeError:  # unreadable: nothing can be verified, so nothing is signalled
                with contextlib.suppress(OSError):
                    path.unlink()
        return found

    def stop_orphans(self, grace: float = STOP_GRACE_SECONDS) -> list[tuple[ProcessRecord, bool]]:
        """Stop recorded processes whose owner is gone; forget records of processes already gone.

        Returns (record, True) for each process stopped, (record, False) for each one that would
        not die even after SIGKILL. Records of a live owner (another process using this state
        directory) are left alone.
        """
        stopped = []
        for record in self.records():
            if is_alive(record.owner_pid, record.owner_identity):
                continue
            if _live_targets(record):
                stopped.append((record, _stop(record, grace)))
            self.remove(record.pid)
        return stopped


def _group_members(record: ProcessRecord) -> list[int]:
    """Live processes of the recorded group that are verifiably the ones gitfaas started."""
    if not _has_proc():
        return [record.pid] if is_alive(record.pid, record.identity) else []
    try:
        started = int(record.identity.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return []
    boot_ok = record.identity.startswith(f"{_boot_id()}/")
    members = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None or stat[0] in ("Z", "X", "x") or stat[1] != record.pid:
            continue
        if pid == record.pid:
            if is_alive(pid, record.identity):
                members.append(pid)
            continue
        # The leader may have exited and left children in its group: a member counts when it was
        # started after the leader (same boot) and carries the marker gitfaas put in the environment.
        if not (boot_ok and stat[2] >= started and record.env_marker):
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if record.env_marker.encode() in environ:
            members.append(pid)
    return members


def _live_targets(record: ProcessRecord) -> bool:
    if record.group:
        return bool(_group_members(record))
    return is_alive(record.pid, record.identity)


def _signal(record: ProcessRecord, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if record.group:
            os.killpg(record.pid, sig)  # verified just before: the group is still gitfaas's
        else:
            os.kill(record.pid, sig)


def _stop(record: ProcessRecord, grace: float) -> bool:
    """SIGTERM, SIGKILL after `grace`; True once nothing of it runs."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        if not _live_targets(record):
            return True
        _signal(record, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _live_targets(record):
                return True
            time.sleep(0.02)
    return not _live_targets(record)


# ---- the running `gitfaas up` -------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UpRecord:
    pid: int
    identity: str | None
    state_dir: str
    bridge_port: int
    nats_url: str | None = None


def running_up(state_dir: Path | str) -> UpRecord | None:
    """The `gitfaas up` serving this state directory, if one runs."""
    data = _read_json(Path(state_dir).expanduser() / UP_FILE)
    if data is None:
        return None
    try:
        record = UpRecord(**data)
    except TypeError:
        return None
    return record if is_alive(record.pid, record.identity) else None


class StateDirBusy(Exception):
    """Another process holds the state directory's lock; `holder` is its record when known."""

    def __init__(self, state_dir: Path, holder: UpRecord | None) -> None:
        super().__init__(f"{state_dir} is in use by another gitfaas up")
        self.state_dir = state_dir
        self.holder = holder


class StateDirLock:
    """The state directory's `up.lock`, held for as long as this object is open."""

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir).expanduser().absolute()
        self._fd: int | None = None

    def acquire(self, holder_wait: float = 2.0) -> StateDirLock:
        """Take the lock at once, or raise StateDirBusy naming the holder (waiting up to
        `holder_wait` for a holder that has just started to write its record)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            deadline = time.monotonic() + holder_wait
            holder = running_up(self.state_dir)
            while holder is None and time.monotonic() < deadline:
                time.sleep(0.05)
                holder = running_up(self.state_dir)
            raise StateDirBusy(self.state_dir, holder) from None
        self._fd = fd
        return self

    def previous(self) -> dict[str, Any] | None:
        """The record the last holder left (it did not stop cleanly when there is one)."""
        return _read_json(self.state_dir / UP_FILE)

    def write(self, bridge_port: int, nats_url: str | None = None) -> None:
        pid, identity = own_identity()
        record = UpRecord(pid=pid, identity=identity, state_dir=str(self.state_dir), bridge_port=bridge_port,
                          nats_url=nats_url)
        _write_json(self.state_dir / UP_FILE, asdict(record))

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            (self.state_dir / UP_FILE).unlink()
        os.close(self._fd)  # closing drops the lock
        self._fd = None

    def __enter__(self) -> StateDirLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *_exc: object) -> None:
        self.release()
