"""`gitfaas up`: the whole system in one process tree on one machine.

Part of the command-line layer (it wires the services together); no service imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

from bridge.app import Bridge, serve
from consumer.service import Consumer
from gitfaas.embedded import EmbeddedNats, free_port
from gitfaas.logs import get_logger
from gitfaas.settings import Settings

log = get_logger("gitfaas.up")


async def up(settings: Settings, *, repo: str, executor: str | None, port: int | None, state_dir: Path) -> None:
    nats_server = EmbeddedNats(state_dir / "nats", port=free_port(preferred=4222))
    await nats_server.start()
    bridge_port = port or settings.bridge_port
    settings = settings.replace(
        nats_url=nats_server.url,
        git_url=repo,
        executor=executor or "local",
        state_dir=str(state_dir),
        bridge_host="127.0.0.1",
        bridge_port=bridge_port,
        bridge_url=f"http://127.0.0.1:{bridge_port}",
        consumer_host="127.0.0.1",
        consumer_http_port=free_port(preferred=settings.consumer_http_port),
        git_poll_seconds=min(settings.git_poll_seconds, 5.0),
    )
    consumer = Consumer(settings)
    bridge = Bridge(settings)
    runner = None
    try:
        await consumer.start()
        await bridge.start()
        runner = await serve(bridge, settings.bridge_host, bridge_port)
        topics = sorted(consumer.config.topics) if consumer.config else []
        first = topics[0] if topics else "<topic>"
        print(
            f"\ngitfaas is up\n"
            f"  nats      {nats_server.url}  (state in {nats_server.store_dir})\n"
            f"  bridge    http://127.0.0.1:{bridge_port}\n"
            f"  consumer  http://127.0.0.1:{consumer.http_port}/readyz  executor={settings.executor}\n"
            f"  repo      {consumer.repository.gitsync.display_source}  topics: {', '.join(topics) or '(none)'}\n\n"
            f"  try: curl -X POST http://127.0.0.1:{bridge_port}/publish/{first} -d 'hello'\n"
            f"  Ctrl-C stops everything.\n",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Event().wait()
    finally:
        log.info("stopping")
        if runner is not None:
            await runner.cleanup()
        with contextlib.suppress(Exception):
            await bridge.stop()
        with contextlib.suppress(Exception):
            await consumer.stop()
        await nats_server.stop()
