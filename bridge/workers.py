"""`BRIDGE_WORKERS` > 1 (issue 17): several bridge processes on one port, supervised by the first.

The first process serves nothing itself: it starts `BRIDGE_WORKERS` workers (`gitfaas bridge
--worker`, each an ordinary bridge whose socket sets SO_REUSEPORT, so the kernel spreads the
connections), restarts any that dies, and on SIGTERM/SIGINT passes the signal to every worker and
waits for each to drain (the aiohttp runner finishes in-flight requests before it closes).

`/metrics` stays one coherent view through Prometheus' multiprocess mode: the workers share a
directory (`PROMETHEUS_MULTIPROC_DIR`, made and removed here), and whichever worker answers adds up
every worker's counters and histograms, including those of workers that died and were replaced.

A worker whose supervisor is gone (SIGKILL, out of memory) stops by itself, draining as on SIGTERM
(`follow_supervisor`): otherwise it would keep the port, unsupervised, after its bridge "stopped".
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time

from gitfaas.logs import get_logger
from gitfaas.settings import Settings

log = get_logger("gitfaas.bridge")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable, set for the workers only
QUICK_DEATH_SECONDS = 2.0  # a worker dead this soon after its start counts towards giving up
QUICK_DEATHS_LIMIT = 5  # in a row: a bridge that cannot start (port taken, bad settings) stops trying


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: dict[int, asyncio.subprocess.Process] = {}
        self.started: dict[int, float] = {}
        self.restarts = 0

    async def _start(self, index: int, env: dict[str, str]) -> None:
        process = await asyncio.create_subprocess_exec(sys.executable, "-m", "cli", "bridge", "--worker", env=env)
        self.workers[index] = process
        self.started[index] = time.monotonic()
        log.info("bridge worker started", worker=index, pid=process.pid)

    async def run(self) -> None:
        directory = tempfile.mkdtemp(prefix="gitfaas-bridge-metrics-")
        env = {**os.environ, MULTIPROC_ENV: directory}
        quick_deaths = 0
        try:
            for index in range(self.settings.bridge_workers):
                await self._start(index, env)
            log.info("bridge listening", host=self.settings.bridge_host, port=self.settings.bridge_port,
                     workers=self.settings.bridge_workers)
            while True:
                waits = {asyncio.ensure_future(p.wait()): i for i, p in self.workers.items()}
                try:
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for future in waits:
                        future.cancel()
                for future in done:
                    index = waits[future]
                    code = self.workers[index].returncode
                    lived = time.monotonic() - self.started[index]
                    quick_deaths = quick_deaths + 1 if lived < QUICK_DEATH_SECONDS else 0
                    if quick_deaths >= QUICK_DEATHS_LIMIT:
                        log.error("bridge workers keep dying at start, giving up", exit_code=code)
                        raise SystemExit(1)
                    log.warning("bridge worker died, restarting it", worker=index, exit_code=code,
                                pid=self.workers[index].pid)
                    self.restarts += 1
                    await self._start(index, env)
        finally:
            await asyncio.shield(self._stop_all())
            shutil.rmtree(directory, ignore_errors=True)

    async def _stop_all(self) -> None:
        """SIGTERM to every worker, then wait for each to drain and exit."""
        log.info("stopping the bridge workers", workers=len(self.workers))
        for process in self.workers.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(process.wait() for process in self.workers.values()))


SUPERVISOR_CHECK_SECONDS = 0.5


async def follow_supervisor(supervisor: int) -> None:
    """In a worker: once the supervisor process is gone (the worker was re-parented), stop this worker
    as SIGTERM would. Polls the parent pid: portable, unlike Linux's parent-death signal."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 — nothing to wait on: a parent's death sends no event
        await asyncio.sleep(SUPERVISOR_CHECK_SECONDS)
    log.warning("bridge supervisor is gone, stopping this worker", supervisor_pid=supervisor)
    os.kill(os.getpid(), signal.SIGTERM)


async def supervise(settings: Settings) -> None:
    await Supervisor(settings).run()
