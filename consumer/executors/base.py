"""What every executor shares: the `Executor` protocol and what it reports.

Kept apart from the executors themselves and from `factory.py`, so that an executor (and the
Job watch it uses) imports these types without importing the package that chooses executors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Applied:
    """One object as applied: what the status document and logs report."""

    api_version: str
    kind: str
    namespace: str | None
    name: str
    uid: str | None = None
    function_uid: str | None = None
    warnings: tuple[str, ...] = ()  # the API server's `Warning` headers on the apply (Pod Security, …)

    def as_dict(self) -> dict[str, Any]:
        found: dict[str, Any] = {"kind": self.kind, "namespace": self.namespace, "name": self.name}
        if self.warnings:
            found["warnings"] = list(self.warnings)
        return found

    def with_function_uid(self, function_uid: str) -> Applied:
        # (Not `dataclasses.replace`, which looks up the fields each time: once per applied object.)
        return Applied(self.api_version, self.kind, self.namespace, self.name, self.uid, function_uid, self.warnings)


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
    """Where executors report what their Jobs do; the consumer turns it into request status.

    `job_changed` answers False when the report could not be stored (the Job's finalizer is then
    kept, so the outcome is reported again); None or True when it was.
    """

    async def job_changed(self, event: JobEvent) -> bool | None: ...


class NoJobEvents:
    async def job_changed(self, event: JobEvent) -> bool | None:
        return None


class Executor(Protocol):
    async def start(self, events: JobEvents) -> None: ...

    async def apply(self, document: dict[str, Any]) -> Applied: ...

    async def close(self) -> None: ...
