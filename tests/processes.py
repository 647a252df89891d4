"""Real child processes for tests: `gitfaas consumer` (crash, signal and sharing tests) and
`gitfaas up` (the whole system on one machine, its output to a file or a pipe)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from gitfaas.embedded import free_port
from gitfaas.statedir import ProcessRecords, process_identity
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


class ConsumerProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.env = {**os.environ, **env, "CONSUMER_HTTP_PORT": str(self.port), "CONSUMER_HOST": "127.0.0.1",
                    "LOG_FORMAT": "json"}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    async def start(self) -> ConsumerProcess:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen([sys.executable, "-m", "cli", "consumer"], env=self.env,
                                        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        await wait_for(self.ready, timeout=20, message=f"consumer on :{self.port} to be ready ({self.log_path})")
        return self

    async def ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"consumer exited with {self.process.returncode}: {self.log_path.read_text()}")
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def applied(self) -> int:
        """Messages this process applied, read from its own /metrics."""
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/metrics") as r:
            text = await r.text()
        return int(sum(float(v) for v in re.findall(
            r'^gitfaas_consumer_messages_total\{[^}]*outcome="applied"[^}]*\} (\S+)$', text, re.M)))

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    async def terminate(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit code, seconds it took to exit)."""
        assert self.process is not None
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout)
        return code, loop.time() - started

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def processes_mentioning(text: str) -> dict[int, str]:
    """pid → command line of live processes (zombies have none) that mention `text`, other than
    `gitfaas up` itself: nats-server and Jobs."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and " -m cli " not in cmdline and int(entry.name) != os.getpid() \
                and process_identity(int(entry.name)):
            found[int(entry.name)] = cmdline
    return found


class Up:
    """One `gitfaas up` child process; its output goes to a file, or to a pipe the test reads."""

    def __init__(self, tmp_path: Path, name: str, repo: Path, state: Path, port: int | None = None) -> None:
        self.log_path = tmp_path / f"{name}.log"
        self.state = state
        self.port = port or free_port()
        self.command = [sys.executable, "-m", "cli", "up", "--repo", str(repo), "--port", str(self.port),
                        "--state-dir", str(state)]
        self.env = {key: value for key, value in os.environ.items() if key != "NATS_URL"}
        self.env.update(LOG_FORMAT="json", CONSUMER_HTTP_PORT=str(free_port()))
        self.process: subprocess.Popen[bytes] | None = None
        self.piped = bytearray()
        self._pipe: asyncio.ReadTransport | None = None

    def start(self) -> Up:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        return self

    async def start_piped(self) -> Up:
        """Output (stdout and stderr) into a pipe read here, like `gitfaas up 2>&1 | tee log`."""
        read_fd, write_fd = os.pipe()
        try:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=write_fd,
                                            stderr=write_fd, stdin=subprocess.DEVNULL)
        finally:
            os.close(write_fd)
        piped = self.piped

        class Reader(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                piped.extend(data)

        loop = asyncio.get_running_loop()
        self._pipe, _ = await loop.connect_read_pipe(Reader, os.fdopen(read_fd, "rb", buffering=0))
        return self

    def close_pipe_reader(self) -> None:
        """What `tee` dying does: from now on every write of `gitfaas up` fails."""
        assert self._pipe is not None
        pipe = self._pipe.get_extra_info("pipe")
        self._pipe.close()  # stops reading at once, but closes the descriptor only later:
        pipe.close()  # closed now, so that the very next write fails

    def output(self) -> str:
        text = self.log_path.read_text() if self.log_path.exists() else ""
        return text + self.piped.decode(errors="replace")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    async def ready(self) -> bool:
        assert self.process is not None
        assert self.process.poll() is None, f"gitfaas up exited with {self.process.returncode}:\n{self.output()}"
        try:
            async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{self.port}/readyz") as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    async def wait_ready(self) -> Up:
        await wait_for(self.ready, timeout=30, interval=0.05, message=f"gitfaas up on :{self.port} to be ready")
        return self

    async def publish(self, topic: str) -> str:
        async with aiohttp.ClientSession() as http, \
                http.post(f"http://127.0.0.1:{self.port}/publish/{topic}", data=b"hello") as response:
            assert response.status == 202, await response.text()
            return str((await response.json())["request_id"])

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.process is not None
        try:
            return await asyncio.wait_for(asyncio.to_thread(self.process.wait), timeout)
        except TimeoutError:
            raise AssertionError(f"gitfaas up did not exit within {timeout}s:\n{self.output()}") from None

    def kill(self) -> None:
        """SIGKILL, as `kill -9` would: its clean-up does not run."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def cleanup(self) -> None:
        """After a test, passed or failed: stop it, and whatever it left, so no test leaks processes."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        ProcessRecords(self.state).stop_orphans(grace=2)
        if self._pipe is not None:
            self._pipe.close()
