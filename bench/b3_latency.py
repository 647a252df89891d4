"""B3 latency at a steady 100 messages/s: HTTP publish to the bridge → Job created in the emulator.

"Created" is when the Job's ADDED event arrives on a watch the bench process holds on the
emulator (ms precision, one clock: the bench's `perf_counter` for both ends). The baseline is the
same measurement for a bare server-side apply from the bench process at the same pace: the floor
of the emulator plus this way of observing it. Bridge, consumer, emulator and nats-server are
separate processes; the load is open-loop (requests leave on schedule, whatever the answers do).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.dynamic import DynamicClient

from bench.common import (
    EMULATOR_GC,
    TOPIC,
    CpuMeter,
    Emulator,
    Profiler,
    Table,
    Target,
    body,
    children,
    make_repo,
    nats_pid,
    nats_server,
    percentile,
    profile_text,
    quiet_gc,
    start_bridge,
    start_consumer,
    start_emulator,
)
from consumer.configuration import load_configuration
from consumer.documents import Request, render_request
from gitfaas.settings import Settings

RATE = 100.0
TARGET_P99_MS = 50.0
REQUEST_ID_ANNOTATION = "gitfaas.io/request-id"


class JobWatch:
    """A watch on the emulator's Jobs: arrival time of each ADDED event, by request id."""

    def __init__(self, emulator: Emulator, http: aiohttp.ClientSession) -> None:
        self.emulator = emulator
        self.http = http
        self.arrivals: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 10)

    async def _run(self) -> None:
        url = f"{self.emulator.url}/apis/batch/v1/namespaces/default/jobs"
        async with self.http.get(url, params={"watch": "true"},
                                 timeout=aiohttp.ClientTimeout(total=None, sock_read=None)) as response:
            response.raise_for_status()
            self._connected.set()  # the emulator sends the headers once it is subscribed
            while line := await response.content.readline():
                now = time.perf_counter()
                event = json.loads(line)
                if event.get("type") != "ADDED":
                    continue
                annotations = (event["object"].get("metadata") or {}).get("annotations") or {}
                key = annotations.get(REQUEST_ID_ANNOTATION)
                if key:
                    self.arrivals.setdefault(key, now)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def paced(count: int, rate: float, fire: Callable[[int], Awaitable[None]]) -> None:
    """Open loop: request i leaves at t0 + i/rate, whether or not earlier ones have finished."""
    started = time.perf_counter()
    tasks = []
    for index in range(count):
        delay = started + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(fire(index)))
    await asyncio.gather(*tasks)


async def wait_arrivals(watch: JobWatch, keys: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    missing = [key for key in keys if key not in watch.arrivals]
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        missing = [key for key in missing if key not in watch.arrivals]


def latencies(sent: dict[str, float], order: list[str], watch: JobWatch, skip: int) -> tuple[list[float], int]:
    """Milliseconds from send to watch event for the messages after the warm-up; and how many never came."""
    measured = order[skip:]
    values = [(watch.arrivals[key] - sent[key]) * 1000 for key in measured if key in watch.arrivals]
    return values, len(measured) - len(values)


async def run(smoke: bool = False, profile: bool = False, work: Path | None = None) -> Table:
    assert work is not None
    warmup, duration = (0.3, 0.7) if smoke else (2.0, 15.0)
    count = int(RATE * (warmup + duration))
    skip = int(RATE * warmup)
    repo = make_repo(work / "repo")
    async with nats_server(work) as server, aiohttp.ClientSession() as http:
        emulator = await start_emulator(work, http)
        bridge = start_bridge(work, server.url)
        consumer = start_consumer(work, server.url, repo, emulator.kubeconfig, bridge.url)
        async with children(emulator.child, bridge.child, consumer.child):
            await consumer.ready(http)
            await bridge.ready(http)
            watch = JobWatch(emulator, http)
            await watch.start()
            try:
                # Baseline: bare server-side apply of the same Jobs at the same pace.
                settings = Settings(nats_url=server.url, git_url=str(repo), kube_namespace="default",
                                    bridge_url=bridge.url)
                config = load_configuration(repo, "b" * 40, settings)
                base_ids = [str(uuid.uuid4()) for _ in range(count)]
                documents = [render_request(settings, config, Request(
                    topic=TOPIC, request_id=rid, identity=f"{rid}|{i}|t", stream_seq=i + 1, body=body(i),
                    params={}))[0] for i, rid in enumerate(base_ids)]
                base_sent: dict[str, float] = {}
                base_answered: list[float] = []
                configuration = k8s_client.Configuration()
                await k8s_config.load_kube_config(config_file=str(emulator.kubeconfig),
                                                  client_configuration=configuration)
                async with k8s_client.ApiClient(configuration) as api:
                    dynamic = await DynamicClient(api, cache_file=str(work / "discovery.json"))
                    jobs = await dynamic.resources.get(api_version="batch/v1", kind="Job")

                    async def apply(index: int) -> None:
                        document = documents[index]
                        base_sent[base_ids[index]] = time.perf_counter()
                        response = await dynamic.server_side_apply(
                            jobs, body=document, name=document["metadata"]["name"], namespace="default",
                            field_manager="gitfaas", force_conflicts=True, serialize=False)
                        async with response:
                            await response.read()
                        if index >= skip:
                            base_answered.append((time.perf_counter() - base_sent[base_ids[index]]) * 1000)

                    quiet_gc()
                    await paced(count, RATE, apply)
                await wait_arrivals(watch, base_ids, 10)
                base, base_lost = latencies(base_sent, base_ids, watch, skip)

                # gitfaas: HTTP publish to the bridge at the same pace.
                sent: dict[str, float] = {}
                order: list[str | None] = [None] * count
                answered: list[float] = []
                url = f"{bridge.url}/publish/{TOPIC}"
                payloads = [body(i) for i in range(count)]

                async def publish(index: int) -> None:
                    began = time.perf_counter()
                    async with http.post(url, data=payloads[index],
                                         headers={"Content-Type": "application/json"}) as response:
                        answer = await response.json()
                    if response.status != 202:
                        raise RuntimeError(f"bridge answered {response.status}: {answer}")
                    sent[answer["request_id"]] = began
                    order[index] = answer["request_id"]
                    if index >= skip:
                        answered.append((time.perf_counter() - began) * 1000)

                meter = CpuMeter({"bridge": bridge.child.pid, "consumer": consumer.child.pid,
                                  "emulator": emulator.child.pid, "nats-server": nats_pid(server)})
                quiet_gc()
                meter.start()
                await paced(count, RATE, publish)
                ids = [rid for rid in order if rid is not None]
                await wait_arrivals(watch, ids, 15)
                meter.stop()
                ours, lost = latencies(sent, ids, watch, skip)
                answers = list(answered)  # what the profiling window below adds is not measured
                emulator_gc = (await emulator.stats(http)).get("gc", {})
                profile_texts = []
                if profile:  # an extra, unmeasured window at the same pace
                    spies = [Profiler(consumer.child.pid, work / "consumer.pyspy.txt", 3),
                             Profiler(bridge.child.pid, work / "bridge.pyspy.txt", 3)]
                    if all(spy.start() for spy in spies):
                        await paced(int(RATE * 3), RATE, publish)
                        for spy in spies:
                            await spy.wait()
                        profile_texts = [profile_text("B3 consumer process at 100 messages/s", spies[0]),
                                         profile_text("B3 bridge process at 100 messages/s", spies[1])]
            finally:
                await watch.stop()

    def row(name: str, values: list[float], missing: int) -> list[Any]:
        return [name, len(values), percentile(values, 50), percentile(values, 90), percentile(values, 99),
                max(values) if values else float("nan"), missing]

    p99, base_p99 = percentile(ours, 99), percentile(base, 99)
    table = Table("B3", f"latency at {RATE:.0f} messages/s: publish → Job created (watch event)",
                  ["path", "messages", "p50 ms", "p90 ms", "p99 ms", "max ms", "no Job seen"], smoke=smoke)
    table.rows = [
        row("baseline: bare server-side apply → watch event", base, base_lost),
        row("  of which: the API server's answer to the apply", base_answered, 0),
        row("gitfaas: POST /publish → bridge → JetStream → consumer → apply → watch event", ours, lost),
        row("  of which: the bridge's 202 answer", answers, 0),
        ["ratio gitfaas / baseline", "", f"{percentile(ours, 50) / percentile(base, 50):.1f}x", "",
         f"{p99 / base_p99:.1f}x", "", ""],
    ]
    table.targets = [Target(f"p99 < {TARGET_P99_MS:.0f} ms", f"{p99:.1f} ms", p99 < TARGET_P99_MS and not lost)]
    table.notes = [
        f"{warmup:g} s warm-up not counted, then {duration:g} s at {RATE:.0f}/s (open loop); 1 KiB JSON bodies; "
        "the consumer runs with its defaults (MAX_CONCURRENCY 32, Job watch, status in KV)",
        "clock: the bench process's perf_counter at send and at the watch event's arrival (both in the same "
        "process), so the figures include the emulator's watch delivery — which the baseline measures alone",
        f"CPU during the gitfaas window (100% = one core): {meter.text()}",
        f"emulator garbage collector (mode {EMULATOR_GC}) over the whole run, by generation: "
        f"{emulator_gc.get('count')} passes, longest {emulator_gc.get('longest_ms')} ms",
    ]
    table.numbers = {"p50_ms": percentile(ours, 50), "p99_ms": p99, "baseline_p50_ms": percentile(base, 50),
                     "baseline_p99_ms": base_p99, "messages": len(ours), "lost": lost}
    table.profile = "\n".join(profile_texts)
    return table
