"""B1 bridge throughput: 64 keep-alive connections POSTing 1 KiB JSON bodies to `/publish/bench`
(wrk when installed, else several aiohttp client processes), against nats-py publishing the same
bodies to the same JetStream stream with 64 in flight from one process (the baseline).

The bridge runs as its own process (`python -m cli bridge`). It needs a configuration: a
consumer loads the repository and publishes its state into the `gitfaas_config` bucket, then
stops — the bridge reads that state from the bucket, so only the bridge is measured. Nothing
consumes the messages during the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import nats

from bench.common import (
    PYTHON,
    TOPIC,
    CpuMeter,
    Profiler,
    Table,
    Target,
    body,
    children,
    make_repo,
    median,
    nats_pid,
    nats_server,
    pct,
    percentile,
    profile_text,
    quiet_gc,
    start_bridge,
)
from consumer.service import Consumer
from gitfaas.settings import Settings

CONNECTIONS = 64
TARGET_RATIO = 0.50
STREAM = "GITFAAS"
SUBJECT = f"gitfaas.topics.{TOPIC}"


async def publish_config(nats_url: str, work: Path) -> None:
    """A consumer (dry-run) loads the repository, publishes the topics to the KV bucket, and stops."""
    repo = make_repo(work / "repo")
    settings = Settings(nats_url=nats_url, git_url=str(repo), git_cache_dir=str(work / "git-cache"),
                        git_poll_seconds=0, executor="dry-run", kube_namespace="default",
                        consumer_host="127.0.0.1", consumer_http_port=0, log_level="WARNING")
    consumer = Consumer(settings)
    await consumer.start()
    await consumer.stop(grace=1)


async def raw_publish(nats_url: str, payload: bytes, warmup: float, duration: float,
                      meter: CpuMeter) -> dict[str, Any]:
    """The baseline: `js.publish` of the same bodies, CONNECTIONS in flight, one process."""
    nc = await nats.connect(servers=[nats_url], name="bench-baseline")
    js = nc.jetstream(timeout=5)
    measuring = False
    stop = False
    latencies: list[float] = []

    async def worker() -> None:
        while not stop:
            began = time.perf_counter()
            await js.publish(SUBJECT, payload, stream=STREAM)
            if measuring:
                latencies.append((time.perf_counter() - began) * 1000)

    tasks = [asyncio.create_task(worker()) for _ in range(CONNECTIONS)]
    try:
        await asyncio.sleep(warmup)
        measuring = True
        meter.start()
        started = time.perf_counter()
        await asyncio.sleep(duration)
        measuring = False
        elapsed = time.perf_counter() - started
        meter.stop()
        count = len(latencies)
    finally:
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
        await nc.close()
    return {"ok": count, "rate": count / elapsed, "seconds": elapsed, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99)}


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    return float(match[1]) * _UNITS_MS[match[2]] if match else float("nan")


def parse_wrk(output: str) -> dict[str, Any]:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", output)
    if total is None:
        raise RuntimeError(f"cannot read wrk's output:\n{output}")
    requests, seconds = int(total[1]), _ms(total[2] + total[3]) / 1000
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    bad = int(non2xx[1]) if non2xx else 0
    latency = {q: _ms(v) for q, v in re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.M)}
    return {"ok": requests - bad, "non2xx": bad, "socket_errors": sum(int(x) for x in errors.groups()) if errors else 0,
            "rate": (requests - bad) / seconds, "seconds": seconds,
            "p50": latency.get("50", float("nan")), "p99": latency.get("99", float("nan"))}


async def run_wrk(url: str, script: Path, seconds: int, meter: CpuMeter | None) -> tuple[dict[str, Any], float]:
    """wrk -t1 -c64 for `seconds`; returns its parsed figures and its own CPU share."""
    out = script.with_suffix(".out")
    with out.open("wb") as sink:
        process = subprocess.Popen(["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{seconds}s", "--latency", "-s", str(script),
                                    url], stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    began = time.perf_counter()
    if meter is not None:
        meter.start()
    _pid, status, usage = await asyncio.to_thread(os.wait4, process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    elapsed = time.perf_counter() - began
    if meter is not None:
        meter.stop(extra_seconds=usage.ru_utime + usage.ru_stime)
    text = out.read_text(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"wrk exited with {process.returncode}:\n{text}")
    return parse_wrk(text), (usage.ru_utime + usage.ru_stime) / elapsed


async def run_aiohttp_clients(url: str, payload_file: Path, warmup: float, duration: float, work: Path,
                              meter: CpuMeter) -> tuple[dict[str, Any], float, int]:
    """The fallback: max(2, cores) client processes sharing CONNECTIONS connections and one window."""
    processes = max(2, os.cpu_count() or 1)
    per = [CONNECTIONS // processes + (1 if i < CONNECTIONS % processes else 0) for i in range(processes)]
    start = time.time() + 1.5  # every client is up before the window opens
    outs = [work / f"httpload-{i}.json" for i in range(processes)]
    clients = [subprocess.Popen([PYTHON, "-m", "bench.httpload", "--url", url, "--connections", str(n),
                                 "--body-file", str(payload_file), "--start", str(start), "--warmup", str(warmup),
                                 "--duration", str(duration), "--out", str(out)],
                                cwd=Path(__file__).resolve().parent.parent, stdin=subprocess.DEVNULL)
               for n, out in zip(per, outs, strict=True)]
    names = {f"client {i + 1}": client.pid for i, client in enumerate(clients)}
    meter.pids.update(names)
    await asyncio.sleep(max(0.0, start + warmup - time.time()))
    meter.start()
    await asyncio.sleep(duration)
    meter.stop()
    cpu = sum(meter.shares.pop(name, 0.0) for name in names)
    for name in names:
        meter.pids.pop(name)
    for client in clients:
        await asyncio.to_thread(client.wait)
    results = [json.loads(out.read_text()) for out in outs]
    ok = sum(r["ok"] for r in results)
    latencies = [v for r in results for v in r["latencies_ms"]]
    return ({"ok": ok, "non2xx": sum(r["other"] for r in results), "socket_errors": sum(r["errors"] for r in results),
             "rate": ok / duration, "p50": percentile(latencies, 50), "p99": percentile(latencies, 99)},
            cpu, processes)


async def run(smoke: bool = False, profile: bool = False, work: Path | None = None, client: str = "auto") -> Table:
    assert work is not None
    # Alternating rounds, so that drift (the store growing, the host's other load) hits both sides alike.
    rounds, warmup, duration = (1, 0, 1) if smoke else (3, 1, 3)
    use_wrk = client == "wrk" or (client == "auto" and shutil.which("wrk") is not None)
    if client == "wrk" and shutil.which("wrk") is None:
        raise RuntimeError("--client wrk asked for, but wrk is not installed")
    # The bridge as deployed: BRIDGE_WORKERS' default (auto: the CPUs it may use), unless the caller sets it.
    workers_setting = os.environ.get("BRIDGE_WORKERS", "auto")
    workers = Settings.from_env({"BRIDGE_WORKERS": workers_setting}).bridge_workers
    payload = body(0)
    payload_file = work / "body.json"
    payload_file.write_bytes(payload)
    script = work / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = [[{payload.decode()}]]\n")
    base_runs: list[dict[str, Any]] = []
    bridge_runs: list[dict[str, Any]] = []
    base_cpu: list[dict[str, float]] = []
    bridge_cpu: list[dict[str, float]] = []
    profiler: Profiler | None = None
    async with nats_server(work) as server:
        await publish_config(server.url, work)
        bridge = start_bridge(work, server.url, workers=workers_setting)
        async with children(bridge.child), aiohttp.ClientSession() as http:
            await bridge.ready(http)
            nc = await nats.connect(servers=[server.url])
            js = nc.jetstream()
            url = f"{bridge.url}/publish/{TOPIC}"
            try:
                quiet_gc()
                for _ in range(rounds):
                    await js.purge_stream(STREAM)
                    meter = CpuMeter({"nats-server": nats_pid(server), "bench (nats-py)": os.getpid()})
                    base_runs.append(await raw_publish(server.url, payload, warmup or 0.2, duration, meter))
                    base_cpu.append({**meter.shares, "other processes": meter.others})
                    await js.purge_stream(STREAM)
                    meter = CpuMeter({"bridge": bridge.child.pid, "nats-server": nats_pid(server)},
                                     trees=frozenset({"bridge"}))
                    if use_wrk:
                        if warmup:
                            await run_wrk(url, script, warmup, None)
                            await js.purge_stream(STREAM)
                        result, client_share = await run_wrk(url, script, duration, meter)
                        client_name = "wrk"
                    else:
                        result, client_share, processes = await run_aiohttp_clients(
                            url, payload_file, warmup, duration, work, meter)
                        client_name = "clients"
                    result["stored"] = (await js.stream_info(STREAM)).state.messages
                    bridge_runs.append(result)
                    bridge_cpu.append({**meter.shares, client_name: client_share, "other processes": meter.others})
                if profile:  # an extra window, not measured: py-spy pauses the process to sample it
                    profiler = Profiler(bridge.child.pid, work / "bridge.pyspy.txt", duration, subprocesses=True)
                    if profiler.start():
                        if use_wrk:
                            await run_wrk(url, script, duration, None)
                        else:
                            await run_aiohttp_clients(url, payload_file, warmup, duration, work,
                                                      CpuMeter({}))
                        await profiler.wait()
                    else:
                        profiler = None
            finally:
                await nc.close()
    base_rate = sum(r["ok"] for r in base_runs) / sum(r["seconds"] for r in base_runs)
    bridge_rate = sum(r["ok"] for r in bridge_runs) / sum(r.get("seconds", duration) for r in bridge_runs)
    ratio = bridge_rate / base_rate
    per_round = ", ".join(f"{b['rate']:,.0f} / {a['rate']:,.0f} = {pct(b['rate'] / a['rate'])}"
                          for a, b in zip(base_runs, bridge_runs, strict=True))
    generator = ("wrk (installed)" if use_wrk else "aiohttp client processes ("
                 + ("--client aiohttp" if shutil.which("wrk") else "wrk not installed") + ")")
    client_text = (f"wrk -t1 -c{CONNECTIONS}" if use_wrk
                   else f"aiohttp, {processes} processes x {CONNECTIONS // processes} conns")
    table = Table("B1", "bridge throughput, 1 KiB bodies, 64 connections",
                  ["side", "load", "202s / acks", "per second", "p50 ms", "p99 ms", "CPU (share of one core)"],
                  smoke=smoke)
    bridge_cpu_text = (f"bridge ({workers} worker processes and their supervisor, added up)" if workers > 1
                       else "bridge process")
    table.rows = [
        ["baseline: nats-py js.publish, one process", f"{CONNECTIONS} in flight", sum(r["ok"] for r in base_runs),
         base_rate, median(r["p50"] for r in base_runs), median(r["p99"] for r in base_runs), _cpu(base_cpu)],
        [f"bridge: POST /publish/bench (BRIDGE_WORKERS={workers_setting}: {workers} "
         f"worker{'s' if workers > 1 else ''})", client_text, sum(r["ok"] for r in bridge_runs), bridge_rate,
         median(r["p50"] for r in bridge_runs), median(r["p99"] for r in bridge_runs), _cpu(bridge_cpu)],
        ["ratio bridge / baseline", "", "", pct(ratio), "", "", ""],
    ]
    table.targets = [Target(f"bridge ≥ {pct(TARGET_RATIO)} of the raw JetStream publish rate", pct(ratio),
                            ratio >= TARGET_RATIO)]
    table.notes = [
        f"load generator: {generator}; "
        f"{rounds} alternating rounds of {warmup} s warm-up + {duration} s measured per side "
        f"(per round, bridge / baseline per second: {per_round}); JSON bodies of {len(payload)} bytes, "
        "Content-Type application/json (the bridge parses them); latencies are medians over the rounds",
        "where things run: all processes share the machine's cores (no pinning); the CPU column is each "
        "process's CPU time over the measured windows, 100% = one core. Baseline: bench process + "
        f"nats-server; bridge side: {bridge_cpu_text} + nats-server + load generator",
        f"check: {sum(r['non2xx'] for r in bridge_runs)} non-202 answers, "
        f"{sum(r['socket_errors'] for r in bridge_runs)} socket errors; JetStream stored "
        f"{sum(r['stored'] for r in bridge_runs):,} messages for {sum(r['ok'] for r in bridge_runs):,} answers "
        "with 202 (the rest were in flight when the window closed)",
    ]
    table.numbers = {"bridge_workers": workers, "bridge_rate": bridge_rate, "baseline_rate": base_rate, "ratio": ratio,
                     "bridge_ok": sum(r["ok"] for r in bridge_runs), "baseline_ok": sum(r["ok"] for r in base_runs)}
    if profiler is not None:
        table.profile = profile_text(
            "B1 bridge processes (workers added up) under the same load (an extra, unmeasured window)", profiler)
    return table


def _cpu(samples: list[dict[str, float]]) -> str:
    names = list(samples[0]) if samples else []
    return ", ".join(f"{name} {median(s[name] for s in samples) * 100:.0f}%" for name in names)
