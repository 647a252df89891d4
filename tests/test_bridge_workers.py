"""Issue 17: BRIDGE_WORKERS — several bridge processes on one port, supervised by the first."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import GitRepo, free_port, make_settings, running_stack, wait_for

ROOT = Path(__file__).resolve().parent.parent


def children(pid: int) -> set[int]:
    try:
        return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    except FileNotFoundError:
        return set()


class Workers:
    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        self.process = process
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path()

    async def ready(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(self.url + "/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False


@pytest.fixture
async def workers(nats_server, repo: GitRepo, tmp_path: Path) -> AsyncIterator[tuple[Workers, aiohttp.ClientSession]]:
    settings = make_settings(nats_server, None, repo.path, tmp_path)
    async with running_stack(settings):  # a consumer writes the configuration the workers read
        port = free_port()
        env = {**os.environ, "NATS_URL": nats_server.url, "BRIDGE_HOST": "127.0.0.1", "BRIDGE_PORT": str(port),
               "BRIDGE_WORKERS": "2", "LOG_FORMAT": "console"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        log = (tmp_path / "bridge.log").open("wb")
        process = subprocess.Popen([sys.executable, "-m", "cli", "bridge"], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        running = Workers(process, port)
        running.log_path = tmp_path / "bridge.log"
        try:
            async with aiohttp.ClientSession() as http:
                await wait_for(lambda: len(children(process.pid)) == 2, timeout=20, message="two workers")
                log_path = tmp_path / "bridge.log"
                await wait_for(lambda: log_path.read_text().count("worker=True") == 2, timeout=30,
                               message="both workers listening")
                await wait_for(lambda: running.ready(http), timeout=30, message="workers ready")
                yield running, http
        finally:
            if process.poll() is None:
                workers_left = children(process.pid)  # (read first: once the supervisor is gone, they are init's)
                process.kill()
                for pid in workers_left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            process.wait(10)
            log.close()


async def publish_fresh(url: str) -> int:
    async with aiohttp.ClientSession() as session, session.post(url + "/publish/hello", json={"n": 1}) as response:
        return response.status


async def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(workers) -> None:
    running, http = workers
    before = children(running.process.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # Its own connections (and any in its accept queue) die with it; once it is gone, no new one goes there.
    await wait_for(lambda: victim not in children(running.process.pid), timeout=10, message="the worker gone")
    statuses = [await publish_fresh(running.url) for _ in range(20)]  # the other worker answers meanwhile
    assert statuses == [202] * 20
    await wait_for(lambda: len(children(running.process.pid) - {victim}) == 2, timeout=20, message="a new worker")
    replacement = children(running.process.pid) - before
    assert len(replacement) == 1
    log_path = running.log_path
    await wait_for(lambda: log_path.read_text().count("worker=True") == 3, timeout=30, message="it listens")
    statuses = [await publish_fresh(running.url) for _ in range(40)]
    assert statuses == [202] * 40
    async with http.get(running.url + "/metrics") as response:
        text = await response.text()
    total = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("gitfaas_bridge_publishes_total{") and 'code="202"' in line)
    assert total >= 60  # one view of every worker's publishes, the dead one's included
    timed = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.startswith("gitfaas_bridge_publish_seconds_count"))
    assert timed == total  # each 202 timed once, in the same view (the workers' value files are intact)


async def test_sigterm_drains_every_in_flight_publish_of_every_worker(workers) -> None:
    """Requests already sent when SIGTERM arrives are all answered 202 (none lost, no reset).

    (A request whose body is still on its way is not in flight yet: aiohttp stops reading at shutdown.)
    """
    running, _ = workers
    body = b'{"pad": "' + b"x" * 1000 + b'"}'
    request = (b"POST /publish/hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body) + body)
    connections = [await asyncio.open_connection("127.0.0.1", running.port) for _ in range(64)]
    # Each connection served once (keep-alive), so a worker has accepted it: the kernel spreads them over both.
    for _reader, writer in connections:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    for reader, _ in connections:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        await reader.readexactly(length)
    for _, writer in connections:
        writer.write(request)
    await asyncio.gather(*(writer.drain() for _, writer in connections))
    running.process.send_signal(signal.SIGTERM)  # while most of the 64 publishes are in flight
    answers = [await asyncio.wait_for(reader.readuntil(b"\r\n"), 20) for reader, _ in connections]
    assert answers == [b"HTTP/1.1 202 Accepted\r\n"] * 64
    for _, writer in connections:
        writer.close()
    assert await asyncio.to_thread(running.process.wait, 30) == 0
    assert not children(running.process.pid)


async def test_workers_stop_when_their_supervisor_is_killed(workers) -> None:
    """A SIGKILLed supervisor cannot stop its workers: they notice they were re-parented and stop
    themselves, draining as on SIGTERM, so nothing keeps the port unsupervised."""
    running, _ = workers
    orphans = children(running.process.pid)
    assert len(orphans) == 2
    running.process.kill()
    running.process.wait(10)

    def gone(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        return state == "Z"  # exited, waiting for its new parent to reap it

    await wait_for(lambda: all(gone(pid) for pid in orphans), timeout=15, message="the orphaned workers stop")
    assert "bridge supervisor is gone" in running.log_path.read_text()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", running.port)  # nobody listens on the port any more
