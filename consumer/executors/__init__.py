"""Executors: what "apply these documents" means (§10).

`kubernetes` applies to a cluster; `dry-run` only prints. The consumer depends on the small
`Executor` protocol only, so executors can be swapped by the `EXECUTOR` setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

from gitfaas.settings import Settings


@dataclass(frozen=True, slots=True)
class Applied:
    """One object as applied: what the status document and logs report."""

    api_version: str
    kind: str
    namespace: str | None
    name: str
    uid: str | None = None
    function_uid: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name}

    def with_function_uid(self, function_uid: str) -> Applied:
        return dataclasses.replace(self, function_uid=function_uid)


@dataclass(frozen=True, slots=True)
class JobEvent:
    """A Job of ours changed state: `running`, `succeeded` or `failed` (with the reason)."""

    request_id: str
    kind: str
    namespace: str | None
    name: str
    state: str
    reason: str | None = None
    topic: str | None = None


class JobEvents(Protocol):
    """Where executors report what their Jobs do; the consumer turns it into request status."""

    async def job_changed(self, event: JobEvent) -> None: ...


class NoJobEvents:
    async def job_changed(self, event: JobEvent) -> None:
        return None


class Executor(Protocol):
    async def start(self, events: JobEvents) -> None: ...

    async def apply(self, document: dict[str, Any]) -> Applied: ...

    async def close(self) -> None: ...


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
