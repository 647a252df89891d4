"""B2 consumer throughput: N messages queued in JetStream → N Jobs in the emulator, by the consumer
process (`python -m cli consumer`, EXECUTOR=kubernetes, MAX_CONCURRENCY=32), against a bare
kubernetes_asyncio server-side-apply loop of the same Jobs, 32 at a time, from the bench process
(the baseline). Each side gets a fresh emulator in its own process (`bench.emulator_server`).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import nats

from bench.common import (
    TOPIC,
    CpuMeter,
    Emulator,
    Profiler,
    Table,
    Target,
    body,
    children,
    consumer_counts,
    make_repo,
    nats_pid,
    nats_server,
    pct,
    profile_text,
    quiet_gc,
    start_consumer,
    start_emulator,
    timed_apply_loop,
)
from consumer.configuration import load_configuration
from consumer.documents import Request, render_request
from gitfaas import natsconn
from gitfaas.message import request_headers
from gitfaas.settings import Settings

CONCURRENCY = 32
TARGET_RATIO = 0.70
SUBJECT = f"gitfaas.topics.{TOPIC}"
POLL_SECONDS = 0.05


def rendered_jobs(repo: Path, count: int, settings: Settings) -> list[dict[str, Any]]:
    """The Jobs the consumer would apply for `count` messages (same manifest, values, stamping)."""
    config = load_configuration(repo, "b" * 40, settings)
    return [
        render_request(settings, config, Request(
            topic=TOPIC, request_id=(rid := str(uuid.uuid4())), identity=f"{rid}|{i + 1}|2026-01-01T00:00:00",
            stream_seq=i + 1, body=body(i), params={}))[0]
        for i in range(count)
    ]


async def apply_loop(emulator: Emulator, documents: list[dict[str, Any]], work: Path) -> float:
    """The baseline: server-side apply of every document, CONCURRENCY at a time; returns seconds."""
    return await timed_apply_loop(str(emulator.kubeconfig), documents, work, namespace="default",
                                  concurrency=CONCURRENCY, request_timeout=15)


async def queue_messages(nats_url: str, count: int, settings: Settings) -> None:
    """Declare the stream and durable as the services do, then store `count` messages."""
    nc = await nats.connect(servers=[nats_url])
    try:
        js = nc.jetstream(timeout=10)
        await natsconn.ensure_all(js, settings)
        semaphore = asyncio.Semaphore(64)

        async def one(index: int) -> None:
            async with semaphore:
                await js.publish(SUBJECT, body(index), stream=settings.stream,
                                 headers=request_headers(str(uuid.uuid4()), content_type="application/json"))

        await asyncio.gather(*(one(i) for i in range(count)))
    finally:
        await nc.close()


async def drain(http: aiohttp.ClientSession, consumer: Any, target: int, timeout: float,
                meter: CpuMeter | None) -> tuple[float, int]:
    """Poll the consumer's counter until it reaches `target`; (seconds, count at the first sighting)."""
    first: tuple[float, int] | None = None
    deadline = time.monotonic() + timeout
    while True:
        consumer.child.check_alive()
        counts = await consumer_counts(http, consumer)
        now = time.perf_counter()
        applied = counts["applied"]
        if counts.get("dead"):
            raise RuntimeError(f"the consumer dead-lettered {counts['dead']} messages; see {consumer.child.log_path}")
        if first is None and applied > 0:
            first = (now, applied)
            if meter is not None:
                meter.start()
        if applied >= target:
            if meter is not None:
                meter.stop()
            assert first is not None
            return now - first[0], first[1]
        if time.monotonic() > deadline:
            raise TimeoutError(f"consumer applied {applied} of {target} in {timeout}s ({consumer.child.log_path})")
        await asyncio.sleep(POLL_SECONDS)


async def run(smoke: bool = False, profile: bool = False, work: Path | None = None) -> Table:
    assert work is not None
    count = 100 if smoke else 5000
    profile_count = 1500
    repo = make_repo(work / "repo")
    async with nats_server(work) as server, aiohttp.ClientSession() as http:
        settings = Settings(nats_url=server.url, git_url=str(repo), kube_namespace="default",
                            bridge_url="http://127.0.0.1:5000", max_concurrency=CONCURRENCY)
        documents = rendered_jobs(repo, count, settings)

        # Baseline: bare server-side apply against a fresh emulator.
        emulator = await start_emulator(work, http, "emulator-baseline")
        async with children(emulator.child):
            meter = CpuMeter({"emulator": emulator.child.pid, "bench (kubernetes_asyncio)": os.getpid()})
            quiet_gc()
            meter.start()
            base_seconds = await apply_loop(emulator, documents, work)
            meter.stop()
            base_cpu = meter.text()
            base_jobs = (await emulator.stats(http))["objects"].get("jobs", 0)

        # gitfaas: the same number of messages queued first, then the consumer process drains them.
        emulator = await start_emulator(work, http, "emulator-consumer")
        await queue_messages(server.url, count, settings)
        consumer = start_consumer(work, server.url, repo, emulator.kubeconfig, "http://127.0.0.1:5000",
                                  max_concurrency=CONCURRENCY)
        profiles = []
        async with children(emulator.child, consumer.child):
            meter = CpuMeter({"emulator": emulator.child.pid, "consumer": consumer.child.pid,
                              "nats-server": nats_pid(server)})
            seconds, first_count = await drain(http, consumer, count, 120 + count / 20, meter)
            consumer_cpu = meter.text()
            consumer_jobs = (await emulator.stats(http))["objects"].get("jobs", 0)
            if profile:  # an extra, unmeasured drain: py-spy pauses the processes it samples
                await queue_messages(server.url, profile_count, settings)
                spies = [Profiler(consumer.child.pid, work / "consumer.pyspy.txt", 4),
                         Profiler(emulator.child.pid, work / "emulator.pyspy.txt", 4)]
                if all(spy.start() for spy in spies):
                    for spy in spies:
                        await spy.wait()
                    profiles = [profile_text("B2 consumer process while draining", spies[0]),
                                profile_text("B2 emulator process while the consumer drains", spies[1])]
                await drain(http, consumer, count + profile_count, 120, None)

    base_rate = count / base_seconds
    rate = (count - first_count) / seconds if seconds > 0 else float("nan")
    ratio = rate / base_rate
    table = Table("B2", f"consumer throughput, {count:,} queued messages → Jobs in the emulator",
                  ["side", "concurrency", "Jobs created", "seconds", "Jobs per second", "CPU (share of one core)"],
                  smoke=smoke)
    table.rows = [
        ["baseline: bare kubernetes_asyncio server-side apply loop", CONCURRENCY, base_jobs, base_seconds,
         base_rate, base_cpu],
        ["gitfaas consumer process (EXECUTOR=kubernetes)", f"MAX_CONCURRENCY={CONCURRENCY}", consumer_jobs,
         seconds, rate, consumer_cpu],
        ["ratio consumer / baseline", "", "", "", pct(ratio), ""],
    ]
    table.targets = [Target(f"consumer ≥ {pct(TARGET_RATIO)} of the bare apply loop", pct(ratio),
                            ratio >= TARGET_RATIO)]
    table.notes = [
        "both sides: server-side apply (field manager gitfaas, force) of the same rendered 60-line Job, each "
        "against a fresh emulator process; the consumer also writes each request's status to the KV bucket, "
        "acks, logs a JSON line and follows its Jobs with a watch, as in production",
        f"consumer rate: from the first applied message seen on its /metrics ({first_count} by then) to the "
        f"last, polled every {POLL_SECONDS * 1000:.0f} ms (start-up and discovery excluded)",
        "where things run: emulator, consumer, nats-server and the bench process are separate processes "
        "sharing the cores; CPU column: CPU time over the window, 100% = one core",
    ]
    table.numbers = {"consumer_rate": rate, "baseline_rate": base_rate, "ratio": ratio,
                     "consumer_jobs": consumer_jobs, "baseline_jobs": base_jobs}
    table.profile = "\n".join(profiles)
    if base_jobs != count or consumer_jobs < count:
        table.notes.append(f"WARNING: expected {count} Jobs on each side")
    return table
