"""A small HTTP load generator, for B1 when `wrk` is not installed: one process of several.

`python -m bench.httpload --url U --connections C --body-file F --start T --warmup W --duration D --out O`
opens C keep-alive connections, POSTs the body in a loop on each, and counts the answers that
complete inside [T + W, T + W + D] (wall clock, so several processes share one window).
Writes {"ok", "other", "errors", "latencies_ms" (a sample), "cpu_s"} as JSON to O.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import aiohttp


async def load(url: str, connections: int, payload: bytes, start: float, warmup: float, duration: float,
               content_type: str) -> dict[str, object]:
    window = (start + warmup, start + warmup + duration)
    ok = other = errors = 0
    latencies: list[float] = []
    headers = {"Content-Type": content_type}
    connector = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.sleep(max(0.0, start - time.time()))

        async def worker() -> None:
            nonlocal ok, other, errors
            while time.time() < window[1]:
                began = time.perf_counter()
                try:
                    async with http.post(url, data=payload, headers=headers) as response:
                        await response.read()
                        status = response.status
                except aiohttp.ClientError:
                    status = -1
                now = time.time()
                if window[0] <= now <= window[1]:
                    if status == 202:
                        ok += 1
                        if len(latencies) < 20_000 or random.random() < 0.05:
                            latencies.append((time.perf_counter() - began) * 1000)
                    elif status == -1:
                        errors += 1
                    else:
                        other += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return {"ok": ok, "other": other, "errors": errors, "latencies_ms": latencies, "cpu_s": time.process_time()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--body-file", type=Path, required=True)
    parser.add_argument("--content-type", default="application/json")
    parser.add_argument("--start", type=float, required=True, help="wall-clock time to begin")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = asyncio.run(load(args.url, args.connections, args.body_file.read_bytes(), args.start, args.warmup,
                              args.duration, args.content_type))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
