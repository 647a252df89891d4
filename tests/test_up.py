"""Issue 4: `gitfaas up` runs the example pipeline end to end on this machine, and stops cleanly."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp

from tests.conftest import wait_for
from tests.processes import ROOT, Up, processes_mentioning

EXAMPLE = ROOT / "examples" / "pipeline"


async def test_up_runs_the_example_pipeline_to_its_final_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    up = Up(tmp_path, "up", EXAMPLE, state)
    try:
        await asyncio.to_thread(up.start)
        await up.wait_ready()
        async with aiohttp.ClientSession() as http, \
                http.post(f"http://127.0.0.1:{up.port}/publish/timeToCollect", json={"rows": 40}) as response:
            assert response.status == 202
            request_id = (await response.json())["request_id"]

        final = state / "volumes" / "pipeline-data" / f"run-{request_id[:8]}.summary.json"
        await wait_for(final.exists, timeout=60, message=f"the pipeline's final file {final}")
        summary = json.loads(final.read_text())
        assert summary["rows"] == 40
        assert summary["sensors"] == ["s0", "s1", "s2", "s3", "s4"]
        assert 10 <= summary["temperature"]["min"] <= summary["temperature"]["mean"] <= summary["temperature"]["max"]
        output = up.output()
        for step in ("collect", "uncompress", "convert"):
            assert f"[{step}-" in output, f"{step} output is shown with its Job prefix"

        up.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert await up.wait_exit(timeout=20) == 0, up.output()[-2000:]
        assert processes_mentioning(str(state)) == {}, "no nats-server or function left behind"
    finally:
        up.cleanup()
