"""`gitfaas up`: the whole system in one process tree on one machine.

Part of the command-line layer (it wires the services together); no service imports it.

Lifecycle, state directory `.gitfaas/` by default (see `gitfaas.statedir`):
- one `gitfaas up` per state directory (`up.lock`); a second one is refused with a sentence
  naming the first;
- processes an earlier `gitfaas up` left running because it was killed (nats-server, local Jobs'
  process groups) are stopped first, one line each;
- a busy bridge port is refused before anything starts;
- any stop request (Ctrl-C, SIGTERM, SIGHUP, output gone: see `cli.main._run` and `cli.output`)
  cancels `up`, whose `finally` stops the bridge, the consumer (and its running Jobs), then
  nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from bridge.app import Bridge, serve
from consumer.service import Consumer
from gitfaas.embedded import EmbeddedNats, free_port
from gitfaas.logs import get_logger
from gitfaas.settings import Settings
from gitfaas.statedir import ProcessRecords, StateDirBusy, StateDirLock

log = get_logger("gitfaas.up")


class UpRefused(Exception):
    """`gitfaas up` cannot start; the message is the sentence the user reads."""


def busy_port_sentence(port: int) -> str:
    other = port + 1 if port < 65535 else 5001
    return (f"port {port} (the bridge) is already in use by another program; choose another port: "
            f"make up PORT={other}, or gitfaas up --port {other}")


def busy_state_dir_sentence(busy: StateDirBusy, shown: str) -> str:
    holder = busy.holder
    if holder is None:
        who = "another gitfaas up"
        how = "stop it (Ctrl-C in its terminal)"
    else:
        who = f"another gitfaas up (pid {holder.pid}, bridge on port {holder.bridge_port})"
        how = f"stop it (Ctrl-C in its terminal, or kill {holder.pid})"
    return (f"{who} is already running on the state directory {shown}; {how}, "
            f"or start this one with another --state-dir")


def _check_port(port: int, host: str = "127.0.0.1") -> None:
    """Refuse a port something listens on, as the bridge's bind would (SO_REUSEADDR included)."""
    if port == 0:
        return
    if not 0 < port <= 65535:
        raise UpRefused(f"--port must be a port number (1-65535), not {port}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UpRefused(busy_port_sentence(port)) from None
            raise UpRefused(f"cannot use port {port} for the bridge: {exc.strerror or exc}") from None


def _say(text: str) -> None:
    print(f"gitfaas up: {text}", file=sys.stderr, flush=True)


def stop_orphans(state_dir: Path, previous_pid: object) -> None:
    """Stop what an earlier `gitfaas up` on this state directory left running, one line each."""
    earlier = f"the earlier gitfaas up (pid {previous_pid})" if isinstance(previous_pid, int) else \
        "an earlier gitfaas up"
    for record, stopped in ProcessRecords(state_dir).stop_orphans():
        unit = f"process group {record.pid}" if record.group else f"pid {record.pid}"
        if stopped:
            _say(f"stopped {record.what} ({unit}), left running by {earlier}, which was killed "
                 f"before it could stop it")
        else:
            _say(f"could not stop {record.what} ({unit}), left running by {earlier}: it survived SIGKILL")


@contextlib.contextmanager
def claim_state_dir(state_dir: Path, port: int) -> Iterator[StateDirLock]:
    """Everything `up` checks before it starts anything; held (the lock) while it runs.

    Raises UpRefused with the sentence to print when this `gitfaas up` must not start.
    """
    lock = StateDirLock(state_dir)
    try:
        lock.acquire()
    except StateDirBusy as busy:
        raise UpRefused(busy_state_dir_sentence(busy, str(state_dir))) from None
    try:
        previous = lock.previous() or {}
        lock.write(bridge_port=port)
        stop_orphans(lock.state_dir, previous.get("pid"))
        _check_port(port)
        yield lock
    finally:
        lock.release()


async def up(settings: Settings, lock: StateDirLock, *, repo: str, executor: str | None, port: int) -> None:
    state_dir = lock.state_dir
    nats_server = EmbeddedNats(state_dir / "nats", port=free_port(preferred=4222),
                               records=ProcessRecords(state_dir))
    consumer: Consumer | None = None
    bridge: Bridge | None = None
    runner = None
    try:
        await nats_server.start()
        lock.write(bridge_port=port, nats_url=nats_server.url)  # CLI commands find NATS here
        settings = settings.replace(
            nats_url=nats_server.url,
            git_url=repo,
            executor=executor or "local",
            state_dir=str(state_dir),
            bridge_host="127.0.0.1",
            bridge_port=port,
            bridge_url=f"http://127.0.0.1:{port}",
            consumer_host="127.0.0.1",
            consumer_http_port=free_port(preferred=settings.consumer_http_port),
            git_poll_seconds=min(settings.git_poll_seconds, 5.0),
        )
        consumer = Consumer(settings)
        bridge = Bridge(settings)
        await consumer.start()
        await bridge.start()
        try:
            runner = await serve(bridge, settings.bridge_host, port)
        except OSError as exc:  # taken since the check at start
            if exc.errno == errno.EADDRINUSE:
                raise UpRefused(busy_port_sentence(port)) from None
            raise
        topics = sorted(consumer.config.topics) if consumer.config else []
        first = topics[0] if topics else "<topic>"
        print(
            f"\ngitfaas is up\n"
            f"  nats      {nats_server.url}  (state in {nats_server.store_dir})\n"
            f"  bridge    http://127.0.0.1:{port}\n"
            f"  dashboard http://127.0.0.1:{port}/\n"
            f"  consumer  http://127.0.0.1:{consumer.http_port}/readyz  executor={settings.executor}\n"
            f"  repo      {consumer.repository.gitsync.display_source}  topics: {', '.join(topics) or '(none)'}\n\n"
            f"  try: curl -X POST http://127.0.0.1:{port}/publish/{first} -d 'hello'\n"
            f"  Ctrl-C stops everything.\n",
            file=sys.stderr,
            flush=True,
        )
        await asyncio.Event().wait()
    finally:
        # Each step on its own: whatever fails, nats-server (and with the consumer, running
        # Jobs) must still be stopped. Output may be gone by now (cli.output absorbs that).
        log.info("stopping")
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.cleanup()
        if bridge is not None:
            with contextlib.suppress(Exception):
                await bridge.stop()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await consumer.stop()
        await nats_server.stop()
