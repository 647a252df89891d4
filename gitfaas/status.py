"""Request status documents in the JetStream key-value bucket `gitfaas_requests` (§6).

The bucket's TTL (`REQUEST_TTL_SECONDS`) expires old requests. Keys are the request ids, which
the bridge makes UUIDs; ids from elsewhere are mapped to a valid key the same way everywhere.
Writes use the bucket's revision (compare-and-set) so two writers never lose each other's update.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any

from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

STATES = ("pending", "applied", "running", "succeeded", "failed", "dead")
_KEY_SAFE = re.compile(r"[A-Za-z0-9_=-]+")


def status_key(request_id: str) -> str:
    if _KEY_SAFE.fullmatch(request_id):
        return request_id
    return "b64-" + base64.urlsafe_b64encode(request_id.encode()).decode().rstrip("=")


def new_status(request_id: str, topic: str, stream_seq: int, parent: str | None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "topic": topic,
        "stream_seq": stream_seq,
        "parent": parent,
        "children": [],
        "state": "pending",
        "attempts": 0,
        "commit": None,
        "documents": [],
        "responses": [],
        "error": None,
    }


class StatusStore:
    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    async def get(self, request_id: str) -> dict[str, Any] | None:
        try:
            entry = await self.kv.get(status_key(request_id))
        except (KeyNotFoundError, NotFoundError):
            return None
        if not entry.value:
            return None
        return json.loads(entry.value)

    async def update(
        self,
        request_id: str,
        change: Callable[[dict[str, Any]], None],
        *,
        create: Callable[[], dict[str, Any]] | None = None,
        attempts: int = 8,
    ) -> dict[str, Any] | None:
        """Read-modify-write with the revision as guard; retried when another writer won."""
        key = status_key(request_id)
        for _ in range(attempts):
            try:
                entry = await self.kv.get(key)
                document = json.loads(entry.value) if entry.value else None
                revision = entry.revision
            except (KeyNotFoundError, NotFoundError):
                document, revision = None, None
            if document is None:
                if create is None:
                    return None
                document = create()
            change(document)
            payload = json.dumps(document).encode()
            try:
                if revision is None:
                    await self.kv.create(key, payload)
                else:
                    await self.kv.update(key, payload, last=revision)
                return document
            except KeyWrongLastSequenceError:
                continue
            except Exception as exc:  # `create` of a key that appeared meanwhile
                if "wrong last sequence" in str(exc).lower() or getattr(exc, "err_code", None) == 10071:
                    continue
                raise
        raise RuntimeError(f"status of {request_id} kept changing under us; update not stored")
