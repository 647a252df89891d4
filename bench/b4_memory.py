"""B4 memory: peak RSS of the consumer and bridge processes, idle and while draining N messages
(published through the bridge, applied by the consumer to the emulator), twice in a row to see
whether anything grows. Read from /proc/<pid>/status (VmHWM, reset between phases through
/proc/<pid>/clear_refs, and VmRSS sampled every 100 ms). Baseline: a Python process that only
imports the same modules (`bench.floor`), i.e. what any such service costs before doing anything.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from bench.common import (
    PYTHON,
    TOPIC,
    Child,
    Service,
    Table,
    Target,
    body,
    children,
    consumer_counts,
    make_repo,
    memory_kib,
    nats_server,
    reset_peak,
    start_bridge,
    start_consumer,
    start_emulator,
    wait_until,
)

CONSUMER_LIMIT_MIB = 150
BRIDGE_LIMIT_MIB = 80
GROWTH_TOLERANCE_MIB = 2.0  # allocator noise; a leak of a few hundred bytes per message shows well above it
PUBLISH_CONCURRENCY = 32


class PeakSampler:
    """Largest VmRSS seen per process while running, plus VmHWM at the end (after a reset)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak_kib = dict.fromkeys(pids, 0)
        self.hwm_reset = {name: reset_peak(pid) for name, pid in pids.items()}
        self._task = asyncio.create_task(self._run())

    def _sample(self) -> None:
        for name, pid in self.pids.items():
            self.peak_kib[name] = max(self.peak_kib[name], memory_kib(pid).get("VmRSS", 0))

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(0.1)

    async def stop(self) -> dict[str, dict[str, float]]:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._sample()
        out = {}
        for name, pid in self.pids.items():
            status = memory_kib(pid)
            peak = self.peak_kib[name]
            if self.hwm_reset[name]:
                peak = max(peak, status.get("VmHWM", 0))
            out[name] = {"peak": peak / 1024, "now": status.get("VmRSS", 0) / 1024}
        return out


async def publish_through_bridge(http: aiohttp.ClientSession, bridge: Service, count: int, offset: int) -> None:
    url = f"{bridge.url}/publish/{TOPIC}"
    pending = iter(range(offset, offset + count))

    async def worker() -> None:
        for index in pending:
            async with http.post(url, data=body(index), headers={"Content-Type": "application/json"}) as response:
                await response.read()
                if response.status != 202:
                    raise RuntimeError(f"bridge answered {response.status}")

    await asyncio.gather(*(worker() for _ in range(PUBLISH_CONCURRENCY)))


async def start_floor(work: Path, service: str) -> Child:
    ready = work / f"floor-{service}.ready"
    ready.unlink(missing_ok=True)
    child = Child(f"floor-{service}", [PYTHON, "-m", "bench.floor", service, str(ready)],
                  work / f"floor-{service}.log").start()

    async def written() -> bool:
        return ready.exists()

    await wait_until(written, 30, f"the {service} import floor", alive=[child])
    return child


async def run(smoke: bool = False, profile: bool = False, work: Path | None = None) -> Table:
    assert work is not None
    count = 100 if smoke else 10_000
    repo = make_repo(work / "repo")
    phases: list[tuple[str, dict[str, dict[str, float]], float]] = []
    async with nats_server(work) as server, aiohttp.ClientSession() as http:
        emulator = await start_emulator(work, http)
        bridge = start_bridge(work, server.url)
        consumer = start_consumer(work, server.url, repo, emulator.kubeconfig, bridge.url)
        floors = [await start_floor(work, "consumer"), await start_floor(work, "bridge")]
        async with children(emulator.child, bridge.child, consumer.child, *floors):
            await consumer.ready(http)
            await bridge.ready(http)
            floor = {"consumer": memory_kib(floors[0].pid).get("VmRSS", 0) / 1024,
                     "bridge": memory_kib(floors[1].pid).get("VmRSS", 0) / 1024}
            pids = {"consumer": consumer.child.pid, "bridge": bridge.child.pid}
            sampler = PeakSampler(pids)
            await asyncio.sleep(0.2 if smoke else 2.0)
            phases.append(("idle (ready, nothing sent)", await sampler.stop(), 0.0))
            for drain in (1, 2):
                sampler = PeakSampler(pids)
                started = time.perf_counter()
                await publish_through_bridge(http, bridge, count, (drain - 1) * count)

                async def drained(target: int = drain * count) -> bool:
                    counts = await consumer_counts(http, consumer)
                    if counts.get("dead"):
                        raise RuntimeError(f"the consumer dead-lettered {counts['dead']} messages")
                    return counts["applied"] >= target

                await wait_until(drained, 60 + count / 20, f"drain {drain} of {count} messages", interval=0.2,
                                 alive=[consumer.child, bridge.child])
                phases.append((f"drain {drain}: {count:,} messages", await sampler.stop(),
                               time.perf_counter() - started))

    idle, first, second = (phase[1] for phase in phases)
    growth = {name: second[name]["peak"] - first[name]["peak"] for name in ("consumer", "bridge")}
    settled = {name: second[name]["now"] - first[name]["now"] for name in ("consumer", "bridge")}
    table = Table("B4", f"memory (RSS, MiB): idle and draining {count:,} messages, twice",
                  ["process", "baseline: imports only", "idle", "drain 1 peak", "drain 2 peak", "after drain 1",
                   "after drain 2", "drain 2 - drain 1 (peak / after)", "peak / baseline"], smoke=smoke)
    for name in ("consumer", "bridge"):
        peak = max(first[name]["peak"], second[name]["peak"])
        table.rows.append([name, floor[name], idle[name]["peak"], first[name]["peak"], second[name]["peak"],
                           first[name]["now"], second[name]["now"],
                           f"{growth[name]:+.2f} / {settled[name]:+.2f}", f"{peak / floor[name]:.2f}x"])
    consumer_peak = max(first["consumer"]["peak"], second["consumer"]["peak"])
    bridge_peak = max(first["bridge"]["peak"], second["bridge"]["peak"])
    table.targets = [
        Target(f"consumer peak < {CONSUMER_LIMIT_MIB} MiB", f"{consumer_peak:.1f} MiB",
               consumer_peak < CONSUMER_LIMIT_MIB),
        Target(f"bridge peak < {BRIDGE_LIMIT_MIB} MiB", f"{bridge_peak:.1f} MiB", bridge_peak < BRIDGE_LIMIT_MIB),
        Target(f"no growth from drain 1 to drain 2 (peak and settled RSS within +{GROWTH_TOLERANCE_MIB:.0f} MiB)",
               ", ".join(f"{name} {growth[name]:+.1f} / {settled[name]:+.1f} MiB" for name in growth),
               all(v <= GROWTH_TOLERANCE_MIB for v in (*growth.values(), *settled.values()))),
    ]
    table.notes = [
        f"each drain: {count:,} 1 KiB JSON messages POSTed to the bridge ({PUBLISH_CONCURRENCY} at a time), the "
        "consumer (MAX_CONCURRENCY 32) applying them as Jobs meanwhile; the phase ends when its /metrics "
        f"count them all applied (drain 1: {phases[1][2]:.0f} s, drain 2: {phases[2][2]:.0f} s)",
        "peak = max(VmHWM after resetting it at the phase start, VmRSS sampled every 100 ms); "
        "'after' = VmRSS at the end of the phase",
    ]
    table.numbers = {"consumer_peak_mib": consumer_peak, "bridge_peak_mib": bridge_peak,
                     "consumer_growth_mib": growth["consumer"], "bridge_growth_mib": growth["bridge"],
                     "consumer_floor_mib": floor["consumer"], "bridge_floor_mib": floor["bridge"]}
    return table
