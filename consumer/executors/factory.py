"""Choosing the executor named by the `EXECUTOR` setting.

The consumer depends on the small `Executor` protocol only (`base.py`); each executor module is
imported only when chosen, so `kubernetes_asyncio` is not loaded for the local executor.
"""

from __future__ import annotations

from consumer.executors.base import Executor
from gitfaas.settings import Settings


def make_executor(settings: Settings) -> Executor:
    if settings.executor == "kubernetes":
        from consumer.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(settings)
    if settings.executor == "dry-run":
        from consumer.executors.dryrun import DryRunExecutor

        return DryRunExecutor()
    if settings.executor == "local":
        from consumer.executors.local import LocalExecutor

        return LocalExecutor(settings)
    raise ValueError(f"executor {settings.executor!r} is not available yet")
