"""B4's baseline: a Python process that imports what a service imports and then idles.

`python -m bench.floor consumer|bridge READY_FILE`: its RSS is the floor a service's own memory is
compared with (the interpreter plus nats-py, aiohttp, kubernetes_asyncio, ... loaded).
"""

from __future__ import annotations

import importlib
import signal
import sys
from pathlib import Path

MODULES = {
    "consumer": ["consumer.service", "consumer.executors.kubernetes", "consumer.jobwatch", "cli.main"],
    "bridge": ["bridge.app", "cli.main"],
}


def main() -> None:
    service, ready = sys.argv[1], Path(sys.argv[2])
    for module in MODULES[service]:
        importlib.import_module(module)
    ready.write_text("ready")
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


if __name__ == "__main__":
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    main()
