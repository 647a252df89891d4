"""The configuration in use: the repository kept in sync, its newest good commit loaded.

A refresh (start-up, poll, `gitfaas.control.refresh`) pulls git and loads a new commit; a commit
that fails its checks is reported and the last good configuration keeps serving. The state is
published to the `gitfaas_config` bucket, where the bridge reads the topics it accepts.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.js.kv import KeyValue

from consumer import metrics
from consumer.configuration import Configuration, ConfigurationError, load_configuration
from consumer.gitsync import GitSync, GitSyncError
from gitfaas.logs import get_logger
from gitfaas.settings import Settings
from gitfaas.subjects import CONFIG_KEY

log = get_logger("gitfaas.consumer")


class Repository:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.gitsync = GitSync(settings)
        self.config: Configuration | None = None
        self.error: str | None = None
        self.bucket: KeyValue | None = None
        self._lock = asyncio.Lock()
        # `DRY_RUN_ON_LOAD`: the problems the API server finds in a commit that passed our own checks.
        self.check: Callable[[Configuration], Awaitable[list[str]]] | None = None

    async def refresh(self) -> dict[str, Any]:
        """Pull git now; load the commit if it is new. Returns the state `/topics` shows."""
        async with self._lock:
            try:
                snapshot = await asyncio.to_thread(self.gitsync.sync)
            except GitSyncError as exc:
                metrics.GIT_SYNCS.labels("error").inc()
                self.error = f"git sync failed: {exc}"
                log.error("git sync failed", error=str(exc))
            else:
                metrics.GIT_SYNCS.labels("ok").inc()
                if self.config is None or snapshot.commit != self.config.commit:
                    await self._load(snapshot.root, snapshot.commit)
                else:
                    self.error = None
            state = self.state()
            await self._publish(state)
            return state

    async def _load(self, root: Path, commit: str) -> None:
        try:
            config = await asyncio.to_thread(load_configuration, root, commit, self.settings)
            if self.check is not None and (problems := await self.check(config)):
                raise ConfigurationError(commit, problems)
        except ConfigurationError as exc:
            metrics.CONFIG_OK.set(0)
            self.error = str(exc)
            log.error("commit refused, keeping the last good configuration", commit=commit,
                      problems=exc.problems, serving=self.config.commit if self.config else None)
            return
        previous = self.config
        self.config = config  # one assignment: a message sees one whole commit
        self.error = None
        metrics.CONFIG_OK.set(1)
        if previous is not None:
            metrics.COMMIT.remove(previous.commit)
        metrics.COMMIT.labels(commit).set(1)
        log.info("configuration loaded", commit=commit, topics=sorted(config.topics))

    def state(self) -> dict[str, Any]:
        source = self.gitsync.display_source
        if self.config is None:
            return {"commit": None, "loaded_at": None, "topics": [], "error": self.error, "source": source}
        return {**self.config.summary(), "error": self.error, "source": source}

    async def _publish(self, state: dict[str, Any]) -> None:
        if self.bucket is None:
            return
        try:
            await self.bucket.put(CONFIG_KEY, json.dumps(state).encode())
        except Exception as exc:  # noqa: BLE001 — the bridge shows stale topics until the next refresh
            log.warning("could not publish configuration state", error=str(exc) or type(exc).__name__)
