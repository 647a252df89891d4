"""The tests' Kubernetes emulator in a process of its own: `python -m bench.emulator_server --dir D`.

It is the slowest part of every consumer benchmark, so it must not share the consumer's (or the
bench's) event loop. Starts `tests.emulator` (kmock's emulator with server-side apply, typed
lists, selectors) on 127.0.0.1, writes its kubeconfig, and a small stats endpoint on another
port (`GET /stats` → object counts, cheap enough to poll). When all is listening it writes
`D/ready.json` with the URLs; SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.emulator import EmulatorHandle, running_emulator


class GcPauses:
    """Durations of the garbage collector's pauses, by generation (gc.callbacks)."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._began = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
            return
        generation = info["generation"]
        took = time.perf_counter() - self._began
        self.count[generation] += 1
        self.total[generation] += took
        self.longest[generation] = max(self.longest[generation], took)

    def as_dict(self) -> dict[str, list[float]]:
        return {"count": self.count, "total_ms": [round(t * 1000, 1) for t in self.total],
                "longest_ms": [round(t * 1000, 1) for t in self.longest]}


def count_objects(handle: EmulatorHandle) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (resource, _namespace, _name), obj in handle.emulator.objects.items():
        if not obj.deleted:
            counts[resource.plural] = counts.get(resource.plural, 0) + 1
    return counts


async def main(folder: Path, gc_mode: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    pauses = GcPauses()
    gc.callbacks.append(pauses)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with running_emulator(folder) as handle:
        async def stats(_request: web.Request) -> web.Response:
            return web.json_response({"objects": count_objects(handle), "gc": pauses.as_dict()})

        app = web.Application()
        app.router.add_get("/stats", stats)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        info = {"url": handle.url, "kubeconfig": str(handle.kubeconfig),
                "stats_url": f"http://127.0.0.1:{port}/stats", "pid": os.getpid()}
        temporary = folder / "ready.json.tmp"
        temporary.write_text(json.dumps(info))
        temporary.rename(folder / "ready.json")
        freezer = asyncio.create_task(freeze_often()) if gc_mode == "freeze" else None
        try:
            await stop.wait()
        finally:
            if freezer is not None:
                freezer.cancel()
            await runner.cleanup()


async def freeze_often() -> None:
    """Move what survived into the permanent generation every second, so that the collector's full
    passes only ever see young objects: kmock keeps every object version and every request, and
    full collections over that heap stall the emulator for 100+ ms (a kube-apiserver does not)."""
    while True:
        await asyncio.sleep(1.0)
        gc.freeze()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", required=True, type=Path, help="where to write kubeconfig and ready.json")
    parser.add_argument("--gc", choices=("freeze", "default"), default="freeze",
                        help="freeze: gc.freeze() every second (default); default: Python's collector as is")
    arguments = parser.parse_args()
    asyncio.run(main(arguments.dir, arguments.gc))
