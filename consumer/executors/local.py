"""`local`: run each `batch/v1` Job's containers as processes on this machine (§10).

For trying a pipeline with no cluster at all. A Job is "accepted" when its first attempt is
started in a background task, as an API server accepts it, and its outcome is reported through
`JobEvents` as the `kubernetes` executor does. What the caller must know:

- `image` is never pulled: `command` + `args` run here, so the command must exist on this machine.
  A container without `command` cannot run (there is no image entrypoint to fall back on).
- The environment is NOT inherited: gitfaas itself holds secrets (`GIT_PERSONAL_TOKEN`,
  `BRIDGE_TOKEN`, `NATS_PASSWORD`...). A process gets only `BASE_ENV` (when set here), then
  `GITFAAS_JOB_NAME`, `GITFAAS_REPO` (the absolute path of `GIT_URL` when that is a local
  directory, as it is on disk, not as of the commit being served), `GITFAAS_VOLUME_<NAME>` per
  volume, then the container's `env` entries with a plain `value` (`valueFrom` is skipped).
- Volumes are folders, named by `GITFAAS_VOLUME_<NAME>` (`mountPath` is ignored): an `emptyDir`
  (or any unknown kind) is a fresh temporary folder for the Job's run, removed afterwards; a
  `persistentVolumeClaim` is `<state_dir>/volumes/<claimName>`, kept and shared by every Job using
  that claim (how pipeline steps hand files on); a `hostPath` is `<state_dir>/volumes/hostpath-…`,
  never the real host path.
- A Job runs once per (namespace, name): a redelivered message re-applies the same name, and the
  marker `<state_dir>/jobs/<namespace>/<name>` (JSON, with the outcome once known) keeps that
  true across restarts. A Job interrupted by `close()` is reported failed and not run again.
- A container that cannot start (no command, command not found) fails the Job at once: retrying
  cannot help. Other failures are retried up to `backoffLimit`; `restartPolicy` is not consulted.
- Each Job's output (and what is said about it) is printed live with its name as prefix and kept in
  `<state_dir>/logs/<namespace>/<name>.log` (at most `LOG_MAX_BYTES`, then rotated once to `.log.1`;
  files older than `REQUEST_TTL_SECONDS` are removed when the executor starts), so `gitfaas logs`
  reads it after a restart too. A failed Job's reason ends with its last lines of output.
- `cancel_job` (a cancelled run) kills the Job's process groups (SIGTERM, then SIGKILL) and reports
  it failed (`Cancelled: …`); it is not run again.
- Each running container's process group is recorded under `<state_dir>/processes/` while it
  runs, so if gitfaas is killed (SIGKILL) the next `gitfaas up` finds and stops it. A Job whose
  marker says it was still running in a process that is gone is reported failed (Interrupted)
  when the next local executor on that state directory starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from consumer.errors import PermanentError, TransientError
from consumer.executors.base import Applied, JobEvent, JobEvents, NoJobEvents
from consumer.prepare import ANNOTATION_REQUEST_ID, ANNOTATION_TOPIC, LABEL_REQUEST_ID
from gitfaas.logs import get_logger
from gitfaas.settings import Settings
from gitfaas.statedir import ProcessRecords, is_alive, own_identity

log = get_logger("gitfaas.executor.local")

DEFAULT_BACKOFF_LIMIT = 6  # as in Kubernetes
DEADLINE_KILL_GRACE_SECONDS = 2.0  # SIGTERM, then SIGKILL after this
CLOSE_KILL_GRACE_SECONDS = 3.0
MAX_RETRY_PAUSE_SECONDS = 2.0
OUTPUT_DRAIN_SECONDS = 2.0  # after exit, for output still in the pipe
MAX_LINE_BYTES = 65536
BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")
SKIPPED = "skipped (the local executor runs only batch/v1 Jobs)"
LOG_MAX_BYTES = 1024 * 1024  # per Job's log file, before it is rotated (one rotated file is kept)
LAST_LINES = 5  # of output, in a failed Job's reason
CANCELLED = "Cancelled: the run was cancelled"
_REFERENCE = re.compile(r"\$(\$|\(([^)]*)\))")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: `$$` is a literal `$`, an unknown `$(VAR)` stays as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(1) == "$":
            return "$"
        return env.get(match.group(2), match.group(0))

    return _REFERENCE.sub(one, text)


def volume_variable(name: str) -> str:
    return "GITFAAS_VOLUME_" + re.sub(r"[-.]", "_", name.upper())


def _safe(part: str) -> str:
    """One path component from a name we do not control: no `/`, never `.` or `..`."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", part).strip(".") or "_"


def _local_repo(git_url: str) -> str | None:
    if not git_url or "://" in git_url:
        return None
    path = Path(git_url).expanduser()
    return str(path.resolve()) if path.is_dir() else None


def _exit_text(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _killpg(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _save(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record))
    os.replace(partial, path)


def _load(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError:  # present but unreadable: it was applied, and running twice is the worse error
        return {}
    return record if isinstance(record, dict) else {}


class _JobLog:
    """One Job's output file, capped and rotated, and its last lines of output (for a failure's reason)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last: deque[str] = deque(maxlen=LAST_LINES)
        self._file: Any = None

    def write(self, line: str, output: bool) -> None:
        if output:
            self.last.append(line.split("] ", 1)[-1])
        try:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8", errors="replace")
            self._file.write(line + "\n")
            self._file.flush()
            if self._file.tell() > LOG_MAX_BYTES:
                self._file.close()
                self._file = None
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
        except OSError as exc:  # the Job runs on; its output is still printed
            log.warning("job output not kept", path=str(self.path), error=str(exc))

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    @staticmethod
    def read(path: Path) -> list[str]:
        lines: list[str] = []
        for part in (path.with_name(path.name + ".1"), path):
            with contextlib.suppress(OSError):
                lines.extend(part.read_text(encoding="utf-8", errors="replace").splitlines())
        return lines


_JOB_LOG: ContextVar[_JobLog | None] = ContextVar("gitfaas_local_job_log", default=None)


class _CannotRun(Exception):
    """The Job can never succeed here (no command, command not found): fail without retrying."""


@dataclass(frozen=True, slots=True)
class _Job:
    applied: Applied
    request_id: str
    topic: str | None
    pod: dict[str, Any]
    backoff_limit: int
    active_deadline: float | None
    marker: Path
    log_path: Path = field(default_factory=Path)

    @property
    def name(self) -> str:
        return self.applied.name


@dataclass(frozen=True, slots=True)
class _Container:
    name: str
    prefix: str  # of its output lines
    argv: list[str]
    env: dict[str, str]
    job: tuple[str, str] = ("", "")  # (namespace, name) of its Job


class LocalExecutor:
    def __init__(self, settings: Settings, out: TextIO | None = None) -> None:
        self._settings = settings
        self._out = out if out is not None else sys.stdout
        self._state = Path(settings.state_dir).expanduser().absolute()  # processes run elsewhere
        self._repo = _local_repo(settings.git_url)
        self._records = ProcessRecords(self._state)
        self._events: JobEvents = NoJobEvents()
        self._admitted: dict[tuple[str, str], asyncio.Task[Applied]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._groups: set[int] = set()  # process groups of the containers running now
        self._jobs: dict[tuple[str, str], asyncio.Task[None]] = {}  # (namespace, name) -> its run, while it runs
        self._job_groups: dict[tuple[str, str], set[int]] = {}
        self._cancelled: set[tuple[str, str]] = set()
        self._closing = False

    # ---- Executor protocol -------------------------------------------------------------------

    async def start(self, events: JobEvents) -> None:
        self._events = events
        await self._fail_interrupted()
        await asyncio.to_thread(self._remove_old_logs)

    def _remove_old_logs(self) -> None:
        """Output of Jobs whose requests have expired: nobody can ask for it any more."""
        limit = time.time() - self._settings.request_ttl_seconds
        for path in self._state.glob("logs/*/*"):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < limit:
                    path.unlink()

    # ---- what §11 asks of a Job after it is applied: cancel it, read its output -------------------

    def _key(self, namespace: str | None, name: str) -> tuple[str, str]:
        return (namespace or self._settings.kube_namespace, name)

    async def cancel_job(self, namespace: str | None, name: str) -> bool:
        """Kill a running Job's processes (its run was cancelled); False if it does not run here."""
        key = self._key(namespace, name)
        task = self._jobs.get(key)
        if task is None or task.done():
            return False
        self._cancelled.add(key)
        task.cancel()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            _done, pending = await asyncio.wait({task}, timeout=CLOSE_KILL_GRACE_SECONDS)
            if not pending:
                break
            for group in list(self._job_groups.get(key, ())):  # a cancellation that did not reach a container
                _killpg(group, sig)
        return True

    def _log_path(self, namespace: str | None, name: str) -> Path:
        namespace, name = self._key(namespace, name)
        return self._state / "logs" / _safe(namespace) / f"{_safe(name)}.log"

    async def logs(self, namespace: str | None, name: str, after: int = 0) -> tuple[list[str], int]:
        """The Job's kept output, each line with its prefix: lines from `after` on, and how many there are."""
        lines = await asyncio.to_thread(_JobLog.read, self._log_path(namespace, name))
        return lines[after:], len(lines)

    async def tail(self, namespace: str | None, name: str, count: int = LAST_LINES) -> list[str]:
        lines, _total = await self.logs(namespace, name)
        return lines[-count:]

    async def apply(self, document: dict[str, Any]) -> Applied:
        metadata = document.get("metadata") or {}
        api_version, kind, name = document.get("apiVersion", ""), document.get("kind", ""), metadata["name"]
        if (api_version, kind) != ("batch/v1", "Job"):
            self._say(f"{kind}/{name}", SKIPPED)
            return Applied(api_version=api_version, kind=kind, namespace=metadata.get("namespace"), name=name)
        if self._closing:
            raise TransientError("the local executor is shutting down")
        job = self._job(document)
        key = (job.applied.namespace or "", name)
        admission = self._admitted.get(key)
        if admission is None:  # registered before any await: a concurrent re-apply finds it
            admission = self._admitted[key] = asyncio.create_task(self._admit(job))
        else:
            self._say(name, "already applied: not run again")
        try:
            return await asyncio.shield(admission)
        except (OSError, TransientError) as exc:
            if self._admitted.get(key) is admission:
                self._admitted.pop(key)  # nothing started: a later apply may try again
            if isinstance(exc, TransientError):
                raise
            raise TransientError(f"cannot record Job {name} under {self._state}: {exc}") from None

    async def close(self) -> None:
        """Kill what runs (SIGTERM, SIGKILL after a grace) and wait, so no process outlives us.

        Cancelling a Job's task makes it stop its processes; the process groups are also signalled
        here directly, so a cancellation that does not reach a container's task (one seen to get
        stuck in a TaskGroup on Python 3.11) cannot keep the shutdown waiting for a Job that never ends.
        """
        self._closing = True
        tasks = list(self._running)
        for task in tasks:
            task.cancel()
        waiting = [*tasks, *self._admitted.values()]
        for sig, grace in ((signal.SIGTERM, CLOSE_KILL_GRACE_SECONDS), (signal.SIGKILL, CLOSE_KILL_GRACE_SECONDS)):
            _done, pending = await asyncio.wait(waiting, timeout=grace) if waiting else (set(), set())
            if not pending:
                break
            for group in list(self._groups):
                _killpg(group, sig)
        await asyncio.gather(*waiting, return_exceptions=True)

    async def wait_idle(self, timeout: float) -> None:
        """Until no Job is running (tests, shutdown); TimeoutError if that takes longer."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._running:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{len(self._running)} local Job(s) still running after {timeout}s")
            await asyncio.wait(set(self._running), timeout=remaining)

    # ---- admission ---------------------------------------------------------------------------

    def _job(self, document: dict[str, Any]) -> _Job:
        """What a Job needs to run; a malformed one is refused, as the API server would."""
        metadata, spec = document["metadata"], document.get("spec") or {}
        name = metadata["name"]
        namespace = metadata.get("namespace") or self._settings.kube_namespace
        pod = ((spec.get("template") or {}).get("spec")) or {}
        containers = pod.get("containers")
        if not isinstance(containers, list) or not containers:
            raise PermanentError(f"Job {name} has no spec.template.spec.containers")
        for container in [*(pod.get("initContainers") or []), *containers]:
            if not isinstance(container, dict) or not container.get("name"):
                raise PermanentError(f"Job {name}: every container needs a name")
        backoff_limit = spec.get("backoffLimit", DEFAULT_BACKOFF_LIMIT)
        deadline = spec.get("activeDeadlineSeconds")
        if isinstance(backoff_limit, bool) or not isinstance(backoff_limit, int) or backoff_limit < 0:
            raise PermanentError(f"Job {name}: backoffLimit must be a whole number >= 0")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, int) or deadline <= 0):
            raise PermanentError(f"Job {name}: activeDeadlineSeconds must be a whole number > 0")
        annotations = metadata.get("annotations") or {}
        request_id = annotations.get(ANNOTATION_REQUEST_ID) or (metadata.get("labels") or {}).get(LABEL_REQUEST_ID, "")
        return _Job(
            applied=Applied(api_version="batch/v1", kind="Job", namespace=namespace, name=name, uid=str(uuid.uuid4())),
            request_id=request_id, topic=annotations.get(ANNOTATION_TOPIC), pod=pod,
            backoff_limit=backoff_limit,
            active_deadline=float(deadline) if deadline is not None else None,
            marker=self._state / "jobs" / _safe(namespace) / _safe(name),
            log_path=self._log_path(namespace, name),
        )

    async def _admit(self, job: _Job) -> Applied:
        """Start the Job unless a marker says it ran already (in this process or an earlier one)."""
        record = await asyncio.to_thread(_load, job.marker)
        if record is not None:
            self._say(job.name, "already applied: not run again")
            return Applied(api_version="batch/v1", kind="Job", namespace=record.get("namespace", job.applied.namespace),
                           name=record.get("name", job.name), uid=record.get("uid"))
        applied = job.applied
        owner_pid, owner_identity = own_identity()
        await asyncio.to_thread(_save, job.marker, {
            "namespace": applied.namespace, "name": applied.name, "uid": applied.uid,
            "request_id": job.request_id, "topic": job.topic, "state": "applied", "reason": None,
            "owner_pid": owner_pid, "owner_identity": owner_identity})
        if self._closing:  # close() began meanwhile: leave the Job to a redelivery
            await asyncio.to_thread(job.marker.unlink, missing_ok=True)
            raise TransientError("the local executor is shutting down")
        task = asyncio.create_task(self._run(job), name=f"local-job-{applied.namespace}/{applied.name}")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        key = self._key(applied.namespace, applied.name)
        self._jobs[key] = task
        task.add_done_callback(lambda _t: self._jobs.pop(key, None))
        return applied

    async def _fail_interrupted(self) -> None:
        """Jobs a killed gitfaas left unfinished (their processes stopped by the next `gitfaas up`):
        their markers still say `applied` and their owner is gone. Report them failed, once."""

        def unfinished() -> list[tuple[Path, dict[str, Any]]]:
            found = []
            for marker in self._state.glob("jobs/*/*"):
                if marker.name.endswith(".partial"):
                    continue
                record = _load(marker)
                if record and record.get("state") == "applied" and record.get("owner_pid") is not None \
                        and record.get("request_id") \
                        and not is_alive(int(record["owner_pid"]), record.get("owner_identity")):
                    found.append((marker, record))
            return found

        for marker, record in await asyncio.to_thread(unfinished):
            reason = "Interrupted: gitfaas was killed while the Job ran"
            self._say(str(record.get("name")), f"failed: {reason}")
            await self._events_report(record, reason)
            try:
                await asyncio.to_thread(_save, marker, {**record, "state": "failed", "reason": reason})
            except OSError as exc:
                log.warning("local job outcome not recorded", job=record.get("name"), error=str(exc))

    async def _events_report(self, record: dict[str, Any], reason: str) -> None:
        event = JobEvent(request_id=str(record["request_id"]), kind="Job", namespace=record.get("namespace"),
                         name=str(record.get("name")), state="failed", reason=reason, topic=record.get("topic"))
        try:
            await self._events.job_changed(event)
        except Exception as exc:  # noqa: BLE001 — a lost status update must not stop the executor
            log.warning("job event not delivered", job=event.name, state="failed", error=str(exc) or type(exc).__name__)

    # ---- one Job -----------------------------------------------------------------------------

    async def _run(self, job: _Job) -> None:
        """All attempts, then the outcome: printed, reported and recorded in the marker."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        state, reason = "failed", "Interrupted: the local executor stopped while the Job ran"
        job_log = _JobLog(job.log_path)
        _JOB_LOG.set(job_log)  # what is said in this task (and its containers' tasks) goes to the Job's log
        key = self._key(job.applied.namespace, job.name)
        try:
            async with self._volumes(job) as volumes:
                failure = await self._attempts(job, volumes)
            state, reason = ("succeeded", None) if failure is None else ("failed", failure)
        except Exception as exc:  # a bug here must still end the Job with a report
            log.exception("local job crashed", job=job.name)
            reason = f"local executor error: {type(exc).__name__}: {exc}"
        finally:  # also when cancelled by close(): the Job did not finish
            if key in self._cancelled:
                reason = CANCELLED
            elif state == "failed" and job_log.last:
                reason = f"{reason}; last output: " + " | ".join(line[:300] for line in job_log.last)
            elapsed = loop.time() - started
            self._say(job.name, f"succeeded in {elapsed:.1f}s" if state == "succeeded" else f"failed: {reason}")
            await self._report(job, state, reason)
            record = {"namespace": job.applied.namespace, "name": job.name, "uid": job.applied.uid,
                      "request_id": job.request_id, "topic": job.topic, "state": state, "reason": reason}
            try:
                await asyncio.to_thread(_save, job.marker, record)
            except OSError as exc:
                log.warning("local job outcome not recorded", job=job.name, error=str(exc))
            job_log.close()
            self._cancelled.discard(key)

    async def _attempts(self, job: _Job, volumes: dict[str, str]) -> str | None:
        """None on success, else the failure reason (`BackoffLimitExceeded: …`, `DeadlineExceeded: …`)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + job.active_deadline if job.active_deadline is not None else None
        try:
            async with asyncio.timeout_at(deadline):  # wall time of the whole Job, retries included
                containers = self._containers(job, volumes)
                attempt = 0
                while True:
                    attempt += 1
                    self._say(job.name, f"started (attempt {attempt})")
                    if attempt == 1:
                        await self._report(job, "running", None)
                    failure = await self._attempt(job, containers)
                    if failure is None:
                        return None
                    if attempt > job.backoff_limit:
                        return f"BackoffLimitExceeded: {failure} ({attempt} attempts)"
                    self._say(job.name, f"attempt {attempt} failed: {failure}")
                    await asyncio.sleep(min(MAX_RETRY_PAUSE_SECONDS, 0.1 * 2 ** (attempt - 1)))
        except _CannotRun as exc:
            return str(exc)
        except TimeoutError:
            return f"DeadlineExceeded: the Job ran longer than activeDeadlineSeconds ({job.active_deadline:g}s)"

    def _containers(self, job: _Job, volumes: dict[str, str]) -> tuple[list[_Container], list[_Container]]:
        """(init containers, containers), argv and environment resolved once for all attempts."""
        init, main = job.pod.get("initContainers") or [], job.pod["containers"]
        several = len(init) + len(main) > 1
        base = {key: os.environ[key] for key in BASE_ENV if key in os.environ}
        base["GITFAAS_JOB_NAME"] = job.name
        if self._repo:
            base["GITFAAS_REPO"] = self._repo
        base.update(volumes)

        def resolve(spec: dict[str, Any]) -> _Container:
            name = str(spec["name"])
            prefix = f"{job.name}/{name}" if several else job.name
            env = dict(base)
            for entry in spec.get("env") or []:
                if "valueFrom" in entry:
                    self._say(prefix, f"warning: env {entry.get('name')} uses valueFrom, which the local executor "
                                      "does not support: skipped")
                    log.warning("env valueFrom skipped", job=job.name, container=name, variable=entry.get("name"))
                    continue
                value = entry.get("value")
                env[str(entry["name"])] = expand("" if value is None else str(value), env)
            if not spec.get("command"):
                raise _CannotRun(f"container {name} has no command (the local executor cannot run an image's "
                                 "entrypoint)")
            argv = [expand(str(arg), env) for arg in [*spec["command"], *(spec.get("args") or [])]]
            return _Container(name=name, prefix=prefix, argv=argv, env=env,
                              job=self._key(job.applied.namespace, job.name))

        return [resolve(spec) for spec in init], [resolve(spec) for spec in main]

    async def _attempt(self, job: _Job, containers: tuple[list[_Container], list[_Container]]) -> str | None:
        """Init containers in order, then all containers at once; None when every one exits 0."""
        init, main = containers
        workdir = await asyncio.to_thread(tempfile.mkdtemp, prefix=f"gitfaas-{_safe(job.name)}-")
        try:
            for container in init:
                failure = await self._process(container, workdir)
                if failure is not None:
                    return failure
            try:
                async with asyncio.TaskGroup() as group:
                    runs = [group.create_task(self._process(container, workdir)) for container in main]
            except ExceptionGroup as errors:  # one could not start: the others were stopped
                cannot = [error for error in errors.exceptions if isinstance(error, _CannotRun)]
                if cannot:
                    raise cannot[0] from None
                raise
            return next((failure for run in runs if (failure := run.result()) is not None), None)
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, ignore_errors=True)

    async def _process(self, container: _Container, workdir: str) -> str | None:
        """Run one container's process in its own process group; kill the group however it ends.

        Output goes through a pipe of our own rather than asyncio's: asyncio's `wait()` returns
        only once its pipes close, so a background child still holding them would hang us.
        """
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        read_fd, write_fd = os.pipe()
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
        except BaseException:
            pipe.close()
            os.close(write_fd)
            raise
        try:
            try:
                process = await asyncio.create_subprocess_exec(
                    *container.argv, cwd=workdir, env=container.env, stdin=asyncio.subprocess.DEVNULL,
                    stdout=write_fd, stderr=write_fd, start_new_session=True)
            except FileNotFoundError:
                raise _CannotRun(f"command not found: {container.argv[0]}") from None
            except PermissionError:
                raise _CannotRun(f"command not executable: {container.argv[0]}") from None
            finally:
                os.close(write_fd)  # the child has it: end of output is when its last holder exits
            self._record(process.pid, container)
            self._groups.add(process.pid)
            self._job_groups.setdefault(container.job, set()).add(process.pid)
            output = asyncio.create_task(self._pump(reader, container.prefix))
            try:
                code = await process.wait()
            finally:
                if process.returncode is None:  # cancelled: deadline or close()
                    grace = CLOSE_KILL_GRACE_SECONDS if self._closing else DEADLINE_KILL_GRACE_SECONDS
                    _killpg(process.pid, signal.SIGTERM)
                    try:
                        await asyncio.wait_for(process.wait(), grace)
                    except TimeoutError:
                        _killpg(process.pid, signal.SIGKILL)
                        await process.wait()
                _killpg(process.pid, signal.SIGKILL)  # whatever it started and left behind
                self._groups.discard(process.pid)
                self._job_groups.get(container.job, set()).discard(process.pid)
                self._records.remove(process.pid)
                with contextlib.suppress(TimeoutError):  # a child that left the group may hold the pipe
                    await asyncio.wait_for(output, OUTPUT_DRAIN_SECONDS)
        finally:
            transport.close()
        return None if code == 0 else f"container {container.name} {_exit_text(code)}"

    def _record(self, pid: int, container: _Container) -> None:
        """For the next `gitfaas up`, should this one be killed before it can stop the group."""
        try:
            self._records.add(pid, f"Job {container.prefix}", group=True,
                              env_marker=f"GITFAAS_JOB_NAME={container.env.get('GITFAAS_JOB_NAME', '')}")
        except OSError as exc:  # the Job runs anyway; only the orphan clean-up would miss it
            log.warning("local job process not recorded", job=container.prefix, error=str(exc))

    async def _pump(self, stream: asyncio.StreamReader, prefix: str) -> None:
        """Output line by line as it comes; an endless line is cut rather than buffered whole."""
        pending = b""
        while chunk := await stream.read(MAX_LINE_BYTES):
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) >= MAX_LINE_BYTES:
                lines, pending = [*lines, pending], b""
            for line in lines:
                self._say(prefix, line.decode(errors="replace").rstrip("\r"), output=True)
        if pending:
            self._say(prefix, pending.decode(errors="replace").rstrip("\r"), output=True)

    @contextlib.asynccontextmanager
    async def _volumes(self, job: _Job) -> AsyncIterator[dict[str, str]]:
        """`GITFAAS_VOLUME_<NAME>` → folder; the temporary ones are removed when the Job ends."""
        variables: dict[str, str] = {}
        temporary: list[str] = []
        try:
            for volume in job.pod.get("volumes") or []:
                claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
                host_path = (volume.get("hostPath") or {}).get("path")
                if claim:
                    path = str(self._state / "volumes" / _safe(str(claim)))
                elif host_path:
                    flat = re.sub(r"[^A-Za-z0-9._-]+", "-", str(host_path).strip("/")) or "root"
                    path = str(self._state / "volumes" / f"hostpath-{flat}")
                else:
                    path = await asyncio.to_thread(tempfile.mkdtemp, prefix=f"gitfaas-{_safe(job.name)}-volume-")
                    temporary.append(path)
                await asyncio.to_thread(os.makedirs, path, exist_ok=True)
                variables[volume_variable(str(volume["name"]))] = path
            yield variables
        finally:
            for path in temporary:
                await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)

    # ---- reporting ---------------------------------------------------------------------------

    async def _report(self, job: _Job, state: str, reason: str | None) -> None:
        event = JobEvent(request_id=job.request_id, kind="Job", namespace=job.applied.namespace, name=job.name,
                         state=state, reason=reason, topic=job.topic)
        try:
            await self._events.job_changed(event)
        except Exception as exc:  # noqa: BLE001 — a lost status update must not stop the Job
            log.warning("job event not delivered", job=job.name, state=state, error=str(exc) or type(exc).__name__)

    def _say(self, prefix: str, text: str, output: bool = False) -> None:
        """A line shown with its prefix, and kept in the Job's log when said while the Job runs."""
        line = f"[{prefix}] {text}"
        self._out.write(line + "\n")
        self._out.flush()
        job_log = _JOB_LOG.get()
        if job_log is not None:
            job_log.write(line, output)
