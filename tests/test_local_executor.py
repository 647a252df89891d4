"""The `local` executor: Jobs as processes on this machine (§10).

Commands are `sys.executable -c …` so they run anywhere; every wait is a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consumer.errors import PermanentError
from consumer.executors.base import JobEvent
from consumer.executors.local import LocalExecutor, expand, volume_variable
from gitfaas.settings import Settings
from tests.conftest import wait_for

PY = sys.executable


class Events:
    """A fake `JobEvents`: keeps what it is told; `fail=True` makes every report raise."""

    def __init__(self, fail: bool = False) -> None:
        self.events: list[JobEvent] = []
        self.fail = fail

    async def job_changed(self, event: JobEvent) -> None:
        self.events.append(event)
        if self.fail:
            raise RuntimeError("status store unavailable")

    def of(self, name: str) -> list[JobEvent]:
        return [event for event in self.events if event.name == name]

    def final(self, name: str) -> JobEvent | None:
        return next((e for e in self.of(name) if e.state in ("succeeded", "failed")), None)


class Harness:
    def __init__(self, tmp_path: Path, events: Events | None = None) -> None:
        self.tmp = tmp_path
        self.out = io.StringIO()
        self.events = events or Events()
        (tmp_path / "repo").mkdir(exist_ok=True)
        self.settings = Settings(state_dir=str(tmp_path / "state"), git_url=str(tmp_path / "repo"))
        self.executor = LocalExecutor(self.settings, out=self.out)

    async def finished(self, name: str, timeout: float = 10.0) -> JobEvent:
        return await wait_for(lambda: self.events.final(name), timeout=timeout, message=f"Job {name} to finish")

    def lines(self) -> list[str]:
        return self.out.getvalue().splitlines()


@pytest.fixture
async def local(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await harness.executor.start(harness.events)
    yield harness
    await harness.executor.close()


def container(code: str, *args: str, name: str = "main", env: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "image": "python:3.11", "command": [PY, "-c", code], "args": list(args)}
    if env:
        spec["env"] = [{"name": key, "value": value} for key, value in env.items()]
    return spec


def job(name: str, *containers: dict[str, Any], backoff_limit: int = 0, deadline: int | None = None,
        volumes: list[dict[str, Any]] | None = None, init: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": list(containers)}
    if volumes:
        pod["volumes"] = volumes
    if init:
        pod["initContainers"] = init
    spec: dict[str, Any] = {"backoffLimit": backoff_limit, "template": {"spec": pod}}
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "default", "labels": {"gitfaas.io/request-id": "req-1"},
                         "annotations": {"gitfaas.io/request-id": f"request-of-{name}"}},
            "spec": spec}


def alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


async def test_success_reports_running_then_succeeded_with_prefixed_output(local: Harness) -> None:
    applied = await local.executor.apply(job("hello", container("print('hi'); print('there', flush=True)")))
    assert (applied.kind, applied.namespace, applied.name) == ("Job", "default", "hello")
    assert applied.uid
    done = await local.finished("hello")
    assert [(e.state, e.reason) for e in local.events.of("hello")] == [("running", None), ("succeeded", None)]
    assert done.request_id == "request-of-hello" and done.namespace == "default" and done.kind == "Job"
    lines = local.lines()
    assert lines[:3] == ["[hello] started (attempt 1)", "[hello] hi", "[hello] there"]
    assert lines[3].startswith("[hello] succeeded in ") and lines[3].endswith("s")
    marker = json.loads((local.tmp / "state" / "jobs" / "default" / "hello").read_text())
    assert marker["state"] == "succeeded" and marker["uid"] == applied.uid


async def test_several_containers_prefix_their_lines_and_all_must_succeed(local: Harness) -> None:
    await local.executor.apply(job("pair", container("print('from a')", name="a"),
                                   container("print('from b'); raise SystemExit(2)", name="b")))
    done = await local.finished("pair")
    assert done.state == "failed" and "container b exited with code 2" in (done.reason or "")
    assert "[pair/a] from a" in local.lines() and "[pair/b] from b" in local.lines()


async def test_backoff_limit_gives_limit_plus_one_attempts(local: Harness) -> None:
    tries = local.tmp / "tries"
    code = f"open({str(tries)!r}, 'a').write('x\\n'); raise SystemExit(3)"
    await local.executor.apply(job("flaky", container(code), backoff_limit=2))
    done = await local.finished("flaky")
    assert done.state == "failed"
    assert done.reason is not None and done.reason.startswith("BackoffLimitExceeded")
    assert "code 3" in done.reason
    assert tries.read_text().count("x") == 3
    assert [e.state for e in local.events.of("flaky")] == ["running", "failed"]
    assert "[flaky] started (attempt 3)" in local.lines()


async def test_deadline_kills_the_process_group(local: Harness) -> None:
    pid_file = local.tmp / "pid"
    # Ignores SIGTERM, so only the SIGKILL that follows the grace period ends it.
    code = (f"import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            f"open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(30)")
    loop_time = asyncio.get_running_loop().time
    started = loop_time()
    await local.executor.apply(job("slow", container(code), backoff_limit=3, deadline=1))
    done = await local.finished("slow", timeout=8)
    assert loop_time() - started < 6
    assert done.state == "failed" and (done.reason or "").startswith("DeadlineExceeded")
    pid = int(pid_file.read_text())
    await wait_for(lambda: not alive(pid), timeout=2, message=f"process {pid} to be gone")
    assert [e.state for e in local.events.of("slow")] == ["running", "failed"]


async def test_environment_is_not_inherited(local: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIT_PERSONAL_TOKEN", "s3cret")
    monkeypatch.setenv("NATS_PASSWORD", "s3cret")
    dump = local.tmp / "env.json"
    spec = container(f"import json, os; json.dump(dict(os.environ), open({str(dump)!r}, 'w'))",
                     env={"GREETING": "hello", "DERIVED": "$(GREETING) world"})
    spec["env"].append({"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}})
    await local.executor.apply(job("envy", spec, volumes=[{"name": "scratch", "emptyDir": {}}]))
    assert (await local.finished("envy")).state == "succeeded"
    env = json.loads(dump.read_text())
    assert env["GREETING"] == "hello" and env["DERIVED"] == "hello world"
    assert "GIT_PERSONAL_TOKEN" not in env and "NATS_PASSWORD" not in env and "FROM_SECRET" not in env
    assert env["GITFAAS_JOB_NAME"] == "envy"
    assert env["GITFAAS_REPO"] == str((local.tmp / "repo").resolve())
    assert "GITFAAS_VOLUME_SCRATCH" in env
    # Beyond the base variables, only what the child Python or the OS add itself (locale coercion, macOS).
    assert set(env) - {"GREETING", "DERIVED"} - {k for k in env if k.startswith("GITFAAS_")} <= {
        "PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "LC_CTYPE", "__CF_USER_TEXT_ENCODING"}
    assert any("FROM_SECRET" in line and "valueFrom" in line for line in local.lines())


def test_expand_follows_kubernetes() -> None:
    env = {"A": "1", "B": "two"}
    assert expand("$(A)-$(B)", env) == "1-two"
    assert expand("$$(A)", env) == "$(A)"
    assert expand("$(UNKNOWN) $(A", env) == "$(UNKNOWN) $(A"
    assert expand("cost $$5 $x", env) == "cost $5 $x"
    assert volume_variable("shared-data.v1") == "GITFAAS_VOLUME_SHARED_DATA_V1"


async def test_command_and_args_are_expanded(local: Harness) -> None:
    dump = local.tmp / "argv.json"
    spec = container(f"import json, sys; json.dump(sys.argv[1:], open({str(dump)!r}, 'w'))",
                     "$(GREETING)", "$$(GREETING)", "$(UNKNOWN)", "x$(GREETING)y", env={"GREETING": "hi"})
    await local.executor.apply(job("args", spec))
    assert (await local.finished("args")).state == "succeeded"
    assert json.loads(dump.read_text()) == ["hi", "$(GREETING)", "$(UNKNOWN)", "xhiy"]


async def test_volumes_empty_dir_is_temporary_and_claims_are_shared(local: Harness) -> None:
    seen = local.tmp / "seen.json"
    write = (f"import json, os; v = os.environ; json.dump([v['GITFAAS_VOLUME_SCRATCH_SPACE'], "
             f"os.path.isdir(v['GITFAAS_VOLUME_SCRATCH_SPACE']), v['GITFAAS_VOLUME_DATA'], "
             f"v['GITFAAS_VOLUME_HOST'], os.getcwd()], open({str(seen)!r}, 'w')); "
             f"open(os.path.join(v['GITFAAS_VOLUME_DATA'], 'step1.txt'), 'w').write('collected')")
    volumes = [{"name": "scratch-space", "emptyDir": {}},
               {"name": "data", "persistentVolumeClaim": {"claimName": "pipeline-data"}},
               {"name": "host", "hostPath": {"path": "/var/lib/data"}}]
    await local.executor.apply(job("step1", container(write), volumes=volumes))
    assert (await local.finished("step1")).state == "succeeded"
    scratch, existed, data, host, workdir = json.loads(seen.read_text())
    assert existed and not os.path.exists(scratch) and not os.path.exists(workdir)
    assert Path(data) == local.tmp / "state" / "volumes" / "pipeline-data"
    assert Path(host) == local.tmp / "state" / "volumes" / "hostpath-var-lib-data"

    read = ("import os, sys; text = open(os.path.join(os.environ['GITFAAS_VOLUME_INPUT'], 'step1.txt')).read(); "
            "print(text); sys.exit(text != 'collected')")
    claim = [{"name": "input", "persistentVolumeClaim": {"claimName": "pipeline-data"}}]
    await local.executor.apply(job("step2", container(read), volumes=claim))
    assert (await local.finished("step2")).state == "succeeded"
    assert "[step2] collected" in local.lines()


async def test_init_containers_run_first_and_their_failure_fails_the_attempt(local: Harness) -> None:
    volume = [{"name": "work", "emptyDir": {}}]
    init = [container("import os; open(os.environ['GITFAAS_VOLUME_WORK'] + '/ready', 'w').write('1')", name="prep")]
    check = container("import os, sys; sys.exit(not os.path.exists(os.environ['GITFAAS_VOLUME_WORK'] + '/ready'))")
    await local.executor.apply(job("ordered", check, init=init, volumes=volume))
    assert (await local.finished("ordered")).state == "succeeded"

    bad_init = [container("raise SystemExit(4)", name="prep")]
    await local.executor.apply(job("blocked", container("print('never')"), init=bad_init))
    done = await local.finished("blocked")
    assert done.state == "failed" and "container prep exited with code 4" in (done.reason or "")
    assert "[blocked/main] never" not in local.lines()


async def test_jobs_that_cannot_start_fail_at_once_with_a_clear_reason(local: Harness) -> None:
    await local.executor.apply(job("missing", {"name": "main", "image": "x", "command": ["no-such-command-gitfaas"]},
                                   backoff_limit=5))
    assert (await local.finished("missing")).reason == "command not found: no-such-command-gitfaas"
    await local.executor.apply(job("entrypoint", {"name": "main", "image": "busybox"}, backoff_limit=5))
    reason = (await local.finished("entrypoint")).reason or ""
    assert reason.startswith("container main has no command")
    assert "[missing] started (attempt 2)" not in local.lines()
    with pytest.raises(PermanentError):
        await local.executor.apply(job("empty"))


async def test_other_kinds_are_skipped_without_events(local: Harness) -> None:
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings", "namespace": "default"},
                  "data": {"a": "b"}}
    applied = await local.executor.apply(config_map)
    assert (applied.kind, applied.name, applied.namespace) == ("ConfigMap", "settings", "default")
    await local.executor.wait_idle(5)
    assert local.events.events == []
    assert local.lines() == ["[ConfigMap/settings] skipped (the local executor runs only batch/v1 Jobs)"]


async def test_a_job_runs_once_even_when_applied_again_or_after_a_restart(local: Harness) -> None:
    runs = local.tmp / "runs"
    document = job("once", container(f"open({str(runs)!r}, 'a').write('x')"))
    first, second = await local.executor.apply(document), await local.executor.apply(document)
    await local.finished("once")
    third = await local.executor.apply(document)
    assert first == second == third
    restarted = Harness(local.tmp)
    await restarted.executor.start(restarted.events)
    try:
        again = await restarted.executor.apply(job("once", container(f"open({str(runs)!r}, 'a').write('x')")))
        await restarted.executor.wait_idle(5)
        await local.executor.wait_idle(5)
    finally:
        await restarted.executor.close()
    assert again == first
    assert runs.read_text() == "x"
    assert restarted.events.events == []
    assert [e.state for e in local.events.of("once")] == ["running", "succeeded"]


async def test_close_kills_running_jobs_and_their_children(local: Harness) -> None:
    pids = local.tmp / "pids"
    code = (f"import os, subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(30)']); open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); "
            f"time.sleep(30)")
    await local.executor.apply(job("forever", container(code)))
    await wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, message="the pids")
    await local.executor.close()
    for pid in map(int, pids.read_text().split()):
        await wait_for(lambda pid=pid: not alive(pid), timeout=3, message=f"process {pid} to be gone")
    done = local.events.final("forever")
    assert done is not None and done.state == "failed" and "Interrupted" in (done.reason or "")


async def test_a_job_ends_with_its_main_process_and_leftover_children_are_killed(local: Harness) -> None:
    child_pid = local.tmp / "child"
    code = (f"import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); "
            f"open({str(child_pid)!r}, 'w').write(str(child.pid)); print('parent done')")
    await local.executor.apply(job("leaver", container(code)))
    assert (await local.finished("leaver", timeout=5)).state == "succeeded"
    pid = int(child_pid.read_text())
    await wait_for(lambda: not alive(pid), timeout=3, message=f"leftover child {pid} to be gone")
    assert "[leaver] parent done" in local.lines()


async def test_a_failing_status_report_does_not_stop_the_job(tmp_path: Path) -> None:
    harness = Harness(tmp_path, Events(fail=True))
    await harness.executor.start(harness.events)
    try:
        await harness.executor.apply(job("robust", container("print('ok')")))
        await harness.executor.wait_idle(10)
    finally:
        await harness.executor.close()
    assert [e.state for e in harness.events.of("robust")] == ["running", "succeeded"]
    assert any(line.startswith("[robust] succeeded in") for line in harness.lines())
