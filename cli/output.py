"""Standard output and error that can disappear under a running service without harm.

`make up | tee log` then Ctrl-C: `tee` dies first, and from then on every write of ours fails
(BrokenPipeError; EIO on a terminal that was closed). Unguarded, the first log line of the
shutdown raises, the shutdown stops half-way and the embedded nats-server is left running.
Guarded, a failed write sends that stream to /dev/null from then on (the bytes still buffered
included), counts as a request to stop, like SIGHUP, and the shutdown goes on quietly.

`guard()` must run before anything keeps a reference to `sys.stdout`/`sys.stderr` (the loggers,
the local executor): it replaces both with guarded streams.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO

_callbacks: list[Callable[[], None]] = []
_lock = threading.Lock()
_lost = False


def lost() -> bool:
    """Has a guarded stream failed since `guard()`?"""
    return _lost


def on_lost(callback: Callable[[], None]) -> None:
    """Call `callback` (from whichever thread wrote) the first time a guarded stream fails;
    at once if one already has."""
    with _lock:
        _callbacks.append(callback)
        already = _lost
    if already:
        _call(callback)


def _call(callback: Callable[[], None]) -> None:
    with contextlib.suppress(Exception):  # e.g. the event loop it schedules on has closed
        callback()


def _output_lost() -> None:
    global _lost
    with _lock:
        first = not _lost
        _lost = True
        callbacks = list(_callbacks)
    if first:
        for callback in callbacks:
            _call(callback)


class GuardedStream:
    """A text stream whose write errors are absorbed: see the module's docstring."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._broken = False

    def _neutralise(self) -> None:
        """Point the stream's descriptor at /dev/null, so what is buffered drains there."""
        self._broken = True
        with contextlib.suppress(Exception):
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        with contextlib.suppress(Exception):
            self._stream.flush()
        _output_lost()

    def write(self, text: str) -> int:
        if self._broken:
            return len(text)
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed under us
            self._neutralise()
            return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if self._broken:
            with contextlib.suppress(Exception):
                self._stream.flush()
            return
        try:
            self._stream.flush()
        except (OSError, ValueError):
            self._neutralise()

    def isatty(self) -> bool:
        if self._broken:
            return False
        with contextlib.suppress(Exception):
            return self._stream.isatty()
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard() -> None:
    """Replace `sys.stdout` and `sys.stderr` with guarded streams (once)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, GuardedStream):
            setattr(sys, name, GuardedStream(stream))
