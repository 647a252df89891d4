"""Issue 11: the process lifecycle of `gitfaas up`, with real processes and real signals.

Whatever stops `gitfaas up` — Ctrl-C while its output goes through a pipe whose reader is gone,
SIGTERM, SIGHUP, even SIGKILL followed by the next `gitfaas up` — no process is left: not the
embedded nats-server, not a running local Job's process group. One `gitfaas up` per state
directory; a busy bridge port is one sentence. Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitfaas.statedir import ProcessRecords, process_identity
from tests.conftest import wait_for
from tests.processes import Up, processes_mentioning

ROOT = Path(__file__).resolve().parent.parent

# The Job: a process that starts a child in its group and both sleep; each names the state
# directory on its command line, so the test finds them (and the nats-server, `-sd <state>/nats`).
JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: sleepy-{{{{RANDOM}}}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: python:3.11-slim
          command: [{python}, "-c", {program}, {marker}]
"""
PROGRAM = ("import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', sys.argv[1]]); "
           "print('sleeping', flush=True); time.sleep(600)")


def kinds(processes: dict[int, str]) -> list[str]:
    return sorted("nats-server" if "nats-server" in cmdline else "job" for cmdline in processes.values())


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A pipeline repository whose one topic runs a Job that sleeps (with a child) until stopped."""
    path = tmp_path / "repo"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"topics": [{"name": "sleepy", "configs": ["sleepy.yaml"]}]}))
    marker = str(tmp_path / "state")
    (path / "sleepy.yaml").write_text(JOB.format(python=json.dumps(sys.executable), program=json.dumps(PROGRAM),
                                                 marker=json.dumps(marker)))
    return path


@pytest.fixture
def nats_default_port_taken() -> Iterator[None]:
    """Keep 4222 (the default NATS_URL) busy, so a command reaching NATS without NATS_URL proves
    it found the running `gitfaas up` through the state directory rather than by luck."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with contextlib.suppress(OSError):  # taken already: just as good
        sock.bind(("127.0.0.1", 4222))
        sock.listen()
    try:
        yield
    finally:
        sock.close()


async def running_job(up: Up) -> tuple[str, dict[int, str]]:
    """Publish `sleepy` and wait until nats-server and the Job (leader and child) all run."""
    request_id = await up.publish("sleepy")
    processes = await wait_for(
        lambda: kinds(found := processes_mentioning(str(up.state))) == ["job", "job", "nats-server"] and found,
        timeout=20, interval=0.05, message="the Job's two processes and nats-server")
    return request_id, processes


def assert_all_gone(pids: dict[int, str], state: Path) -> None:
    identities = {pid: process_identity(pid) for pid in pids}
    assert [cmdline for pid, cmdline in pids.items() if identities[pid]] == [], "processes left running"
    assert processes_mentioning(str(state)) == {}, "nothing runs for this state directory"
    assert not (state / "up.json").exists(), "the running gitfaas up's record is removed when it stops"
    assert ProcessRecords(state).records() == [], "no process record is left behind"


async def stop_and_assert_all_gone(up: Up, stop: str, processes: dict[int, str]) -> None:
    if stop == "SIGINT, output piped and its reader closed":
        up.close_pipe_reader()
        up.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
    else:
        up.process.send_signal(getattr(signal, stop))  # type: ignore[union-attr]
    code = await up.wait_exit()
    assert code == 0, up.output()[-3000:]
    assert "Traceback" not in up.output()
    assert_all_gone(processes, up.state)


@pytest.mark.parametrize("stop", ["SIGINT, output piped and its reader closed", "SIGTERM", "SIGHUP"])
async def test_every_stop_request_stops_nats_server_and_running_jobs(tmp_path: Path, repo: Path, stop: str) -> None:
    up = Up(tmp_path, "up", repo, tmp_path / "state")
    try:
        await (up.start_piped() if stop.startswith("SIGINT") else asyncio.to_thread(up.start))
        await up.wait_ready()
        _, processes = await running_job(up)
        await stop_and_assert_all_gone(up, stop, processes)
    finally:
        up.cleanup()


async def test_output_pipe_closed_while_running_stops_everything(tmp_path: Path, repo: Path) -> None:
    """`gitfaas up | head`: once its output is gone, the next write is a request to stop."""
    up = Up(tmp_path, "up", repo, tmp_path / "state")
    try:
        await up.start_piped()
        await up.wait_ready()
        _, processes = await running_job(up)
        up.close_pipe_reader()
        await up.publish("sleepy")  # its Job's output line cannot be written: gitfaas up stops
        assert await up.wait_exit() == 0
        assert_all_gone(processes, up.state)
    finally:
        up.cleanup()


async def test_killed_up_orphans_are_stopped_by_the_next_one_which_alone_owns_the_state_dir(
        tmp_path: Path, repo: Path, nats_default_port_taken: None) -> None:
    state = tmp_path / "state"
    first = Up(tmp_path, "first", repo, state)
    second = Up(tmp_path, "second", repo, state)
    third = Up(tmp_path, "third", repo, state)
    other_state = tmp_path / "other-state"
    busy = Up(tmp_path, "busy", repo, other_state, port=second.port)
    try:
        # SIGKILL: nothing of gitfaas up runs its clean-up, nats-server and the Job live on.
        await asyncio.to_thread(first.start)
        await first.wait_ready()
        request_id, orphans = await running_job(first)
        first.kill()
        assert processes_mentioning(str(state)) == orphans, "SIGKILL left orphans (what this test is about)"

        # The next gitfaas up on the same state directory stops them, one line each, verified.
        await asyncio.to_thread(second.start)
        await second.wait_ready()
        assert all(process_identity(pid) is None for pid in orphans), "every orphan is stopped"
        output = second.output()
        nats_pid = next(pid for pid, cmdline in orphans.items() if "nats-server" in cmdline)
        assert (f"gitfaas up: stopped nats-server (pid {nats_pid}), left running by the earlier gitfaas up "
                f"(pid {first.pid}), which was killed before it could stop it") in output
        job_pid = next(pid for pid, cmdline in orphans.items() if "subprocess.Popen" in cmdline)  # the leader
        assert "gitfaas up: stopped Job sleepy-" in output and f"(process group {job_pid}), left running by the " \
            f"earlier gitfaas up (pid {first.pid})" in output, output
        assert kinds(processes_mentioning(str(state))) == ["nats-server"], "only the second one's nats-server"

        # A second concurrent gitfaas up on the same state directory is refused at once.
        await asyncio.to_thread(third.start)
        assert await third.wait_exit(timeout=15) == 1
        assert third.output().strip() == (
            f"gitfaas up: another gitfaas up (pid {second.pid}, bridge on port {second.port}) is already running "
            f"on the state directory {state}; stop it (Ctrl-C in its terminal, or kill {second.pid}), "
            f"or start this one with another --state-dir")
        assert await second.ready(), "the first one keeps serving"

        # CLI commands find the running gitfaas up's NATS through the state directory; the Job
        # the killed one ran shows failed (it was interrupted), not running for ever.
        env = {**second.env, "GITFAAS_STATE_DIR": str(state)}
        status = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli", "status", request_id, "--json", cwd=ROOT, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await asyncio.wait_for(status.communicate(), 30)
        assert status.returncode == 0, out.decode()
        document = json.loads(out)
        assert document["request_id"] == request_id
        assert document["state"] == "failed", "the Job the killed gitfaas up ran is reported interrupted"
        assert "Interrupted: gitfaas was killed while the Job ran" in json.dumps(document)

        # A busy bridge port: one sentence, exit 1, nothing started.
        await asyncio.to_thread(busy.start)
        assert await busy.wait_exit(timeout=15) == 1
        assert busy.output().strip() == (
            f"gitfaas up: port {second.port} (the bridge) is already in use by another program; choose another "
            f"port: make up PORT={second.port + 1}, or gitfaas up --port {second.port + 1}")
        assert processes_mentioning(str(other_state)) == {}

        # And the second one stops with SIGTERM, its Job and nats-server included.
        processes = await wait_for(lambda: len(found := processes_mentioning(str(state))) == 1 and found,
                                   timeout=5, message="the second one's nats-server")
        await second.publish("sleepy")
        processes |= await wait_for(lambda: len(found := processes_mentioning(str(state))) == 3 and found,
                                    timeout=20, message="the Job of the second one")
        await stop_and_assert_all_gone(second, "SIGTERM", processes)
    finally:
        for up in (busy, third, second, first):
            up.cleanup()


def test_a_recorded_pid_is_signalled_only_while_it_is_still_that_process(tmp_path: Path) -> None:
    """A pid reused by an unrelated process, or a live owner's process, is never signalled."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        records = ProcessRecords(tmp_path)
        records.directory.mkdir(parents=True)
        dead_owner = {"owner_pid": 999_999_999, "owner_identity": "gone/1"}
        reused = {"pid": sleeper.pid, "identity": "another-boot/1", "what": "nats-server", **dead_owner}
        (records.directory / f"{sleeper.pid}.json").write_text(json.dumps(reused))
        assert records.stop_orphans(grace=0.5) == []
        assert sleeper.poll() is None, "an unrelated process with a recorded pid is left alone"
        assert records.records() == [], "its stale record is forgotten"

        records.add(sleeper.pid, "Job mine", group=True)  # owner: this live process
        assert records.stop_orphans(grace=0.5) == []
        assert sleeper.poll() is None, "a live owner's process is its owner's business"

        record = json.loads((records.directory / f"{sleeper.pid}.json").read_text())
        (records.directory / f"{sleeper.pid}.json").write_text(json.dumps({**record, **dead_owner}))
        assert [(r.what, stopped) for r, stopped in records.stop_orphans(grace=5)] == [("Job mine", True)]
        assert sleeper.wait(timeout=5) == -signal.SIGTERM
    finally:
        sleeper.kill()
        sleeper.wait()
