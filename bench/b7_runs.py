"""B7 run listing at scale: `GET /runs` (and the other run look-ups) with 100,000 stored requests.

The stores are filled as the consumer fills them — status documents in `gitfaas_requests`, run
documents and request pointers in `gitfaas_runs`, built with the same functions (`gitfaas.runs`) —
as 25,000 runs of four requests on five topics over the last two days (90% succeeded, 5% failed,
3% running, 2% cancelled). Then a bridge process (`python -m cli bridge`) is asked, one request at
a time, for the recent runs (no filter, by topic, by state, since an hour ago), one run by an
8-character prefix, and one request by prefix; each 200 times, latency measured at the client.

`python -m bench.b7_runs [--smoke] [--requests N]` (or `python -m bench B7` where registered).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import nats

from bench.common import Table, Target, children, http_ok, nats_server, percentile, start_bridge, wait_until
from gitfaas import natsconn
from gitfaas.runs import ensure_runs_bucket, entry_of, evaluate, new_run, pointer_key, rfc3339, run_key, set_entry
from gitfaas.settings import Settings

TARGET_P99_MS = 50.0
STEPS = 4
TOPICS = ["ingest", "clean", "train", "report", "export"]
CALLS = 200


def request_document(rid: str, topic: str, parent: str | None, root: str, state: str, start: float,
                     seq: int) -> dict[str, Any]:
    finished = state != "running"
    return {"request_id": rid, "topic": topic, "stream_seq": seq, "parent": parent, "children": [],
            "state": state, "attempts": 1, "retry": 0, "commit": "c" * 40,
            "documents": [{"kind": "Job", "namespace": "default", "name": f"{topic}-{rid[:10]}",
                           "function_uid": f"{rid}.0.{uuid.uuid4().hex[:16]}", "state": state,
                           "reason": "BackoffLimitExceeded: exit 1" if state == "failed" else None}],
            "responses": [None], "error": "Job failed: BackoffLimitExceeded" if state == "failed" else None,
            "root": root, "published_at": rfc3339(start), "applied_at": rfc3339(start + 0.01),
            "started_at": rfc3339(start + 0.5), "finished_at": rfc3339(start + 20) if finished else None}


async def fill(nats_url: str, requests: int, settings: Settings) -> list[str]:
    """`requests` status documents in runs of STEPS; returns the run ids."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream(timeout=30)
        _config, status_kv = await natsconn.ensure_all(js, settings)
        runs_kv = await ensure_runs_bucket(js, settings)
        generator = random.Random(15)
        now = time.time()
        semaphore = asyncio.Semaphore(256)
        run_ids: list[str] = []

        async def put(kv: Any, key: str, value: dict[str, Any]) -> None:
            async with semaphore:
                await kv.put(key, json.dumps(value).encode())

        async def one_run(index: int) -> None:
            start = now - 2 * 86400 * (1 - index / max(1, requests // STEPS))  # oldest first
            topic = TOPICS[index % len(TOPICS)]
            roll = generator.random()
            final = "succeeded" if roll < 0.90 else "failed" if roll < 0.95 else "running" if roll < 0.98 \
                else "cancelled"
            ids = [str(uuid.uuid4()) for _ in range(STEPS)]
            run = new_run(ids[0], topic, rfc3339(start))
            writes = []
            for step, rid in enumerate(ids):
                state = final if step == STEPS - 1 else "succeeded"
                document = request_document(rid, TOPICS[(index + step) % len(TOPICS)], ids[step - 1] if step else None,
                                            ids[0], state, start + step * 20, index * STEPS + step + 1)
                set_entry(run, rid, entry_of(document))
                writes.append(put(status_kv, rid, document))
                if step:
                    writes.append(put(runs_kv, pointer_key(rid), {"root": ids[0]}))
            run["cancelled"] = final == "cancelled"
            evaluate(run, rfc3339(start + STEPS * 20))  # (also its `updated_at`: written as it would be then)
            writes.append(put(runs_kv, run_key(ids[0]), run))
            await asyncio.gather(*writes)
            run_ids.append(ids[0])

        batch = 500
        for first in range(0, requests // STEPS, batch):
            await asyncio.gather(*(one_run(i) for i in range(first, min(first + batch, requests // STEPS))))
        return run_ids
    finally:
        await nc.close()


async def keep_writing(nats_url: str, settings: Settings, per_second: float = 100.0) -> None:
    """New runs at a steady rate (as a busy consumer writes them), until cancelled."""
    nc = await nats.connect(nats_url)
    try:
        runs_kv = await ensure_runs_bucket(nc.jetstream(), settings)
        while True:
            rid = str(uuid.uuid4())
            run = new_run(rid, TOPICS[0], rfc3339(time.time()))
            set_entry(run, rid, {"topic": TOPICS[0], "parent": None, "state": "applied", "done": False})
            evaluate(run, rfc3339(time.time()))
            await runs_kv.put(run_key(rid), json.dumps(run).encode())
            await asyncio.sleep(1 / per_second)
    finally:
        await nc.close()


async def timed(http: aiohttp.ClientSession, url: str, calls: int) -> tuple[list[float], Any]:
    latencies, last = [], None
    for _ in range(calls):
        started = time.perf_counter()
        async with http.get(url) as response:
            last = await response.json()
            if response.status != 200:
                raise RuntimeError(f"{url} answered {response.status}: {last}")
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, last


async def run(smoke: bool = False, profile: bool = False, work: Path | None = None, requests: int | None = None
              ) -> Table:
    assert work is not None
    count = requests or (2000 if smoke else 100_000)
    calls = 20 if smoke else CALLS
    async with nats_server(work) as server, aiohttp.ClientSession() as http:
        settings = Settings(nats_url=server.url)
        filled_at = time.perf_counter()
        run_ids = await fill(server.url, count, settings)
        fill_seconds = time.perf_counter() - filled_at
        bridge = start_bridge(work, server.url)
        async with children(bridge.child):
            async def up() -> bool:
                return await http_ok(http, bridge.url + "/healthz")

            await wait_until(up, 30, "the bridge", alive=[bridge.child])
            some = run_ids[len(run_ids) // 2]
            queries = [
                ("recent runs (limit 50)", "/runs"),
                ("one topic", f"/runs?topic={TOPICS[2]}"),
                ("failed runs (5%)", "/runs?state=failed"),
                ("started in the last hour", "/runs?since=1h"),
                ("one run by an 8-character prefix", f"/runs/{some[:8]}"),
                ("one request by an 8-character prefix", f"/requests/{some[:8]}"),
            ]
            queries.append(("recent runs, while 100 runs/s are written", "/runs"))
            rows, worst = [], 0.0
            for label, path in queries:
                await timed(http, bridge.url + path, 3)  # warm-up
                writer = asyncio.create_task(keep_writing(server.url, settings)) if "written" in label else None
                try:
                    latencies, last = await timed(http, bridge.url + path, calls)
                finally:
                    if writer is not None:
                        writer.cancel()
                returned = len(last["runs"]) if isinstance(last, dict) and "runs" in last else 1
                p99 = percentile(latencies, 99)
                if path.startswith("/runs") and "/runs/" not in path:  # the listings the target is about
                    worst = max(worst, p99)
                rows.append([label, f"GET {path}", returned, percentile(latencies, 50), p99, max(latencies)])
    table = Table("B7", f"run look-ups with {count:,} stored requests ({len(run_ids):,} runs of {STEPS})",
                  ["query", "route", "runs returned", "p50 ms", "p99 ms", "max ms"], smoke=smoke)
    table.rows = rows
    table.targets = [Target(f"GET /runs p99 < {TARGET_P99_MS:.0f} ms at 100,000 stored requests", f"{worst:.1f} ms",
                            worst < TARGET_P99_MS)]
    table.notes = [
        f"stores filled as the consumer fills them in {fill_seconds:.0f} s: a status document per request, a run "
        "document per run and a pointer per request below a root in gitfaas_runs",
        f"{calls} sequential calls per query against a bridge process, after 3 warm-up calls; latency at the client",
        "the bridge keeps the newest 50,000 runs' summaries in memory (loaded once, at its first listing: the "
        "warm-up), and before each listing reads only the index entries written since the one before (batched "
        "direct gets); prefixes are found by a subject filter on the first 8 characters, never by reading every key",
    ]
    table.notes.append("the target is about the listings (GET /runs with or without filters); the look-ups by "
                       "prefix are shown beside them")
    table.numbers = {"p99_ms": worst, "requests": count, "runs": len(run_ids)}
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.b7_runs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--requests", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="gitfaas-b7-") as tmp:
        table = asyncio.run(run(smoke=args.smoke, work=Path(tmp), requests=args.requests))
    print(table.render())
    if args.json:
        args.json.write_text(json.dumps(table.as_json(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
