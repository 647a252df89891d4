"""Issue 4: `gitfaas up` runs the example pipeline end to end on this machine, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from gitfaas.embedded import free_port
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that mention `text` (our temporary state folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():  # (tmp_path itself mentions pytest)
            found.append(f"{entry.name}: {cmdline}")
    return found


async def test_up_runs_the_example_pipeline_to_its_final_file(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "state"
    log = (tmp_path / "up.log").open("wb")
    env = {**os.environ, "LOG_FORMAT": "json", "CONSUMER_HTTP_PORT": str(free_port())}
    up = subprocess.Popen(
        [sys.executable, "-m", "cli", "up", "--repo", "examples/pipeline", "--port", str(port),
         "--state-dir", str(state)],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    try:
        async with aiohttp.ClientSession() as http:
            async def ready() -> bool:
                assert up.poll() is None, (tmp_path / "up.log").read_text()
                try:
                    async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                        return response.status == 200
                except aiohttp.ClientError:
                    return False

            await wait_for(ready, timeout=30, message="gitfaas up to be ready")
            async with http.post(f"http://127.0.0.1:{port}/publish/timeToCollect", json={"rows": 40}) as response:
                assert response.status == 202
                request_id = (await response.json())["request_id"]

        final = state / "volumes" / "pipeline-data" / f"run-{request_id[:8]}.summary.json"
        await wait_for(final.exists, timeout=60, message=f"the pipeline's final file {final}")
        summary = json.loads(final.read_text())
        assert summary["rows"] == 40
        assert summary["sensors"] == ["s0", "s1", "s2", "s3", "s4"]
        assert 10 <= summary["temperature"]["min"] <= summary["temperature"]["mean"] <= summary["temperature"]["max"]
        output = (tmp_path / "up.log").read_text()
        for step in ("collect", "uncompress", "convert"):
            assert f"[{step}-" in output, f"{step} output is shown with its Job prefix"
    finally:
        up.send_signal(signal.SIGINT)
        try:
            code = up.wait(timeout=20)
        finally:
            up.kill()
            log.close()
    assert code == 0, (tmp_path / "up.log").read_text()[-2000:]
    assert processes_mentioning(str(state)) == [], "no nats-server or function left behind"
