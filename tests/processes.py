"""Running `gitfaas consumer` as a real child process, for crash, signal and sharing tests."""

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
from tests.conftest import wait_for


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
