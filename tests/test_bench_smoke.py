"""Issue #8: the benchmarks run. A smoke run only: tiny sizes, tables with positive numbers, no timing
targets asserted (those are `make bench`'s business, on a quiet machine)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from aiohttp import web

from bench.b1_bridge import parse_wrk
from gitfaas.embedded import free_port

ROOT = Path(__file__).resolve().parent.parent

POSITIVE = {
    "B1": ["bridge_rate", "baseline_rate", "ratio", "bridge_ok", "baseline_ok"],
    "B2": ["consumer_rate", "baseline_rate", "ratio", "consumer_jobs", "baseline_jobs"],
    "B3": ["p50_ms", "p99_ms", "baseline_p50_ms", "baseline_p99_ms", "messages"],
    "B4": ["consumer_peak_mib", "bridge_peak_mib", "consumer_floor_mib", "bridge_floor_mib"],
    "B5": ["render_us", "deepcopy_us", "json_us", "ratio_vs_deepcopy"],
    "B7": ["p99_ms", "requests", "runs"],
}


@pytest.mark.timeout(300)  # ~15 s normally; a busy shared machine must not make it fail
def test_every_benchmark_runs_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--json", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert not report["failures"]
    assert report["machine"]["cores"] >= 1 and report["machine"]["cpu"]
    tables = {table["key"]: table for table in report["tables"]}
    assert list(tables) == ["B1", "B2", "B3", "B4", "B5", "B7"]
    for key, names in POSITIVE.items():
        table = tables[key]
        assert f"### {key} — " in result.stdout
        assert table["rows"] and table["targets"], key
        for name in names:
            assert table["numbers"][name] > 0, (key, name, table["numbers"])
    assert tables["B2"]["numbers"]["consumer_jobs"] == tables["B2"]["numbers"]["baseline_jobs"]
    assert tables["B3"]["numbers"]["lost"] == 0
    assert result.stdout.count("machine: ") >= 5  # every table names the machine


def test_wrk_output_is_read() -> None:
    output = """Running 3s test @ http://127.0.0.1:5000/publish/bench
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.51ms    4.87ms  61.43ms   80.12%
    Req/Sec     5.13k   412.77     5.79k    70.00%
  Latency Distribution
     50%   11.20ms
     75%   14.01ms
     90%   18.30ms
     99%  540.00us
  15321 requests in 3.00s, 3.28MB read
  Socket errors: connect 0, read 0, write 0, timeout 2
  Non-2xx or 3xx responses: 21
Requests/sec:   5104.05
Transfer/sec:      1.09MB
"""
    figures = parse_wrk(output)
    assert figures["ok"] == 15300 and figures["non2xx"] == 21 and figures["socket_errors"] == 2
    assert figures["rate"] == 5100.0 and figures["p50"] == 11.2 and figures["p99"] == 0.54


async def test_the_fallback_load_generator_counts_answers_in_its_window(tmp_path: Path) -> None:
    """B1 without wrk: `bench.httpload` processes POST over keep-alive connections and count 202s."""
    seen = 0

    async def accept(request: web.Request) -> web.Response:
        nonlocal seen
        await request.read()
        seen += 1
        return web.json_response({"ok": True}, status=202)

    app = web.Application()
    app.router.add_post("/publish/bench", accept)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    body = tmp_path / "body.json"
    body.write_text('{"x": 1}')
    out = tmp_path / "out.json"
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.httpload", "--url", f"http://127.0.0.1:{port}/publish/bench",
            "--connections", "4", "--body-file", str(body), "--start", str(time.time() + 0.5), "--warmup", "0.1",
            "--duration", "0.3", "--out", str(out), cwd=ROOT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        await runner.cleanup()
    result = json.loads(out.read_text())
    assert 0 < result["ok"] <= seen and result["other"] == 0 and result["errors"] == 0
    assert result["latencies_ms"] and all(v > 0 for v in result["latencies_ms"])
