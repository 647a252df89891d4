"""`dry-run`: print what would be applied, mark it applied. For trying a repository safely."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import yaml

from consumer.executors.base import Applied, JobEvents


class DryRunExecutor:
    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out or sys.stdout

    async def start(self, events: JobEvents) -> None:
        return None

    async def apply(self, document: dict[str, Any]) -> Applied:
        self._out.write("---\n" + yaml.safe_dump(document, sort_keys=False))
        self._out.flush()
        metadata = document.get("metadata", {})
        return Applied(
            api_version=document["apiVersion"],
            kind=document["kind"],
            namespace=metadata.get("namespace"),
            name=metadata["name"],
        )

    async def close(self) -> None:
        return None
