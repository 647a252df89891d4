"""Request status documents in the JetStream key-value bucket `gitfaas_requests` (§6).

The bucket's TTL (`REQUEST_TTL_SECONDS`) expires old requests. Keys are the request ids, which
are checked (`gitfaas.subjects.check_request_id`) before they become a key: a key is part of a
NATS subject, and an id from a message could otherwise be anything. Writes use the bucket's
revision (compare-and-set) so two writers never lose each other's update.

A request id belongs to the stored message that first used it (`claim`): another message
carrying the same id is refused, so it cannot overwrite the owner's status, responses or lineage.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from gitfaas import fast
from gitfaas.jspublish import WRONG_LAST_SEQUENCE
from gitfaas.subjects import InvalidName, check_request_id

STATES = ("pending", "applied", "running", "succeeded", "failed", "dead", "unknown")
KV_HEADER_ALLOWANCE = 256  # the headers a key-value write adds (its expected revision), with room to spare


class StatusTooLarge(ValueError):
    """The document would be larger than NATS accepts in one message (the server would close the
    connection of a client that sent it): it is not written."""
_UID_TOKEN = re.compile(r"[0-9]{1,6}")
_UID_SECRET = re.compile(r"[a-z0-9]{1,64}")


def status_key(request_id: str) -> str:
    """The bucket key of a request: the id itself, once checked. Raises `InvalidName` otherwise."""
    return check_request_id(request_id)


def is_request_id(value: str) -> bool:
    try:
        check_request_id(value)
    except InvalidName:
        return False
    return True


def request_key_of_function(function_uid: str) -> str | None:
    """The status key a `FUNCTION_UID` names (see `consumer.variables.function_uid`), if well formed."""
    parts = function_uid.rsplit(".", 2)
    if len(parts) != 3 or not _UID_TOKEN.fullmatch(parts[1]) or not _UID_SECRET.fullmatch(parts[2]) \
            or not is_request_id(parts[0]):
        return None
    return parts[0]


def set_response(document: dict[str, Any], function_uid: str, value: Any) -> bool:
    """Store a function's response at its document's position; False if the uid is not there."""
    documents = document.get("documents", [])
    responses = document.setdefault("responses", [])
    responses.extend([None] * (len(documents) - len(responses)))
    for index, entry in enumerate(documents):
        if entry.get("function_uid") == function_uid:
            responses[index] = value
            return True
    return False


def new_status(request_id: str, topic: str, stream_seq: int, parent: str | None) -> dict[str, Any]:
    return {
        "request_id": request_id,
        "topic": topic,
        "stream_seq": stream_seq,
        "parent": parent,
        "children": [],
        "state": "pending",
        "attempts": 0,
        "retry": 0,
        "commit": None,
        "documents": [],
        "responses": [],
        "error": None,
    }


@dataclass(slots=True)
class Claim:
    """The outcome of `StatusStore.claim`: the id is this message's (`owner` None), or another's."""

    owner: int | None = None  # the stream sequence of the message the id belongs to, if not this one
    document: dict[str, Any] | None = None  # as written by the claim, with its revision: the next
    revision: int | None = None  # update of this message can skip reading it back


def is_wrong_last_sequence(exc: Exception) -> bool:
    """Another writer was first (a key-value write whose expected revision is not the key's last)."""
    return isinstance(exc, KeyWrongLastSequenceError) or "wrong last sequence" in str(exc).lower() \
        or getattr(exc, "err_code", None) == WRONG_LAST_SEQUENCE


class KeyTurns:
    """Writers of one key in this process take turns.

    A request's ten Jobs all reporting at once would otherwise race each other's revisions until
    their retries run out ("kept changing under us"); other processes are kept apart by the
    revision guard. `async with turns(key):` — entries go when nobody waits on them.
    """

    def __init__(self) -> None:
        self._keys: dict[str, tuple[asyncio.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    @contextlib.asynccontextmanager
    async def __call__(self, key: str) -> AsyncIterator[None]:
        lock, waiting = self._keys.get(key) or (asyncio.Lock(), 0)
        self._keys[key] = (lock, waiting + 1)
        try:
            async with lock:
                yield
        finally:
            lock, waiting = self._keys[key]
            if waiting == 1:
                del self._keys[key]
            else:
                self._keys[key] = (lock, waiting - 1)


class StatusStore:
    def __init__(self, kv: KeyValue, max_bytes: int | None = None) -> None:
        """`max_bytes`: the server's `max_payload`; a document that would not fit is refused (`StatusTooLarge`)."""
        self.kv = kv
        self.max_bytes = max_bytes
        self._turn = KeyTurns()

    def _encode(self, request_id: str, document: dict[str, Any]) -> bytes:
        payload = fast.dumps(document)  # orjson when installed (issue 17)
        if self.max_bytes and len(payload) + KV_HEADER_ALLOWANCE > self.max_bytes:
            raise StatusTooLarge(f"the status of {request_id} would be {len(payload)} bytes, more than NATS accepts "
                                 f"({self.max_bytes})")
        return payload

    async def get(self, request_id: str) -> dict[str, Any] | None:
        if not is_request_id(request_id):
            return None  # an id that cannot be a key has no status
        try:
            entry = await self.kv.get(status_key(request_id))
        except (KeyNotFoundError, NotFoundError):
            return None
        if not entry.value:
            return None
        return fast.loads_trusted(entry.value)

    async def claim(self, request_id: str, stream_seq: int, create: Callable[[], dict[str, Any]],
                    attempts: int = 8) -> Claim:
        async with self._turn(status_key(request_id)):
            return await self._claim(request_id, stream_seq, create, attempts)

    async def _claim(self, request_id: str, stream_seq: int, create: Callable[[], dict[str, Any]],
                     attempts: int) -> Claim:
        """Make `request_id` belong to stream message `stream_seq`, unless another message has it.

        The first message handled with an id writes its document (`create()`, with `stream_seq`); a
        redelivery of that message finds its own sequence there. A document without a sequence
        (a Job reported before its apply was recorded) is adopted.
        """
        key = status_key(request_id)
        assume_new = True  # the usual case: one write, no read
        for _ in range(attempts):
            if assume_new:
                entry, assume_new = None, False
            else:
                try:
                    entry = await self.kv.get(key)
                except (KeyNotFoundError, NotFoundError):
                    entry = None
            if entry is None or not entry.value:
                document = create()
                try:
                    revision = await self.kv.create(key, self._encode(request_id, document))
                except Exception as exc:  # `create` of a key that appeared meanwhile
                    if is_wrong_last_sequence(exc):
                        continue
                    raise
                return Claim(None, document, revision)
            document = fast.loads_trusted(entry.value)
            owner = int(document.get("stream_seq") or 0)
            if owner == stream_seq:
                return Claim(None, document, entry.revision)
            if owner:
                return Claim(owner)
            document["stream_seq"] = stream_seq
            try:
                revision = await self.kv.update(key, self._encode(request_id, document), last=entry.revision)
            except Exception as exc:
                if is_wrong_last_sequence(exc):
                    continue
                raise
            return Claim(None, document, revision)
        raise RuntimeError(f"status of {request_id} kept changing under us; not claimed")

    async def wait(self, request_id: str, done: Callable[[dict[str, Any]], bool],
                   timeout: float) -> tuple[bool, dict[str, Any] | None]:
        """Until `done(document)` or the timeout, from a key watch (no polling).

        Returns whether it got there, and the last document seen (None if there is none).
        """
        if not is_request_id(request_id):
            return False, None
        return await wait_for_key(self.kv, status_key(request_id), done, timeout)

    async def update(
        self,
        request_id: str,
        change: Callable[[dict[str, Any]], None],
        *,
        create: Callable[[], dict[str, Any]] | None = None,
        attempts: int = 8,
        known: Claim | None = None,
    ) -> dict[str, Any] | None:
        async with self._turn(status_key(request_id)):
            return await self._update(request_id, change, create=create, attempts=attempts, known=known)

    async def _update(
        self,
        request_id: str,
        change: Callable[[dict[str, Any]], None],
        *,
        create: Callable[[], dict[str, Any]] | None,
        attempts: int,
        known: Claim | None,
    ) -> dict[str, Any] | None:
        """Read-modify-write with the revision as guard; retried when another writer won.

        With `create`, the first try assumes the document is new and skips the read: most
        requests are recorded once, so this saves a round trip on the hot path (bench B2).
        With `known` (what this message's `claim` wrote), the first try starts from that instead.
        """
        key = status_key(request_id)
        assume_new = create is not None and known is None
        for _ in range(attempts):
            if known is not None and known.document is not None and known.revision is not None:
                document, revision = fast.loads_trusted(fast.dumps(known.document)), known.revision
                known = None
            elif assume_new:
                document, revision, assume_new = None, None, False
            else:
                try:
                    entry = await self.kv.get(key)
                    document = fast.loads_trusted(entry.value) if entry.value else None
                    revision = entry.revision
                except (KeyNotFoundError, NotFoundError):
                    document, revision = None, None
            if document is None:
                if create is None:
                    return None
                document = create()
            change(document)
            payload = self._encode(request_id, document)
            try:
                if revision is None:
                    await self.kv.create(key, payload)
                else:
                    await self.kv.update(key, payload, last=revision)
                return document
            except Exception as exc:  # another writer won, or `create` of a key that appeared meanwhile
                if is_wrong_last_sequence(exc):
                    continue
                raise
        raise RuntimeError(f"status of {request_id} kept changing under us; update not stored")


def merge_documents(document: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Set the request's documents, keeping Job states that were reported before (a fast Job
    can finish before the consumer has written that it was applied)."""
    known = {(d.get("kind"), d.get("namespace"), d.get("name")): d for d in document.get("documents", [])}
    merged = []
    for entry in entries:
        previous = known.get((entry.get("kind"), entry.get("namespace"), entry.get("name")))
        if previous and previous.get("state") in ("running", "succeeded", "failed"):
            entry = {**entry, "state": previous["state"], "reason": previous.get("reason")}
        merged.append(entry)
    document["documents"] = merged
    responses = document.setdefault("responses", [])
    responses.extend([None] * (len(merged) - len(responses)))


def record_job_state(document: dict[str, Any], kind: str, namespace: str | None, name: str, state: str,
                     reason: str | None) -> None:
    for entry in document.setdefault("documents", []):
        if entry.get("kind") == kind and entry.get("namespace") == namespace and entry.get("name") == name:
            entry["state"], entry["reason"] = state, reason
            break
    else:  # reported before the apply was recorded: keep it for `merge_documents`
        document["documents"].append({"kind": kind, "namespace": namespace, "name": name, "function_uid": None,
                                      "state": state, "reason": reason})


def summarize(document: dict[str, Any]) -> None:
    """The request's state from its documents: its Jobs decide once it has been applied."""
    if document.get("state") in ("pending", "dead"):
        return
    jobs = [d for d in document.get("documents", []) if d.get("kind") == "Job"]
    states = [d.get("state") for d in jobs]
    if "failed" in states:
        failed = next(d for d in jobs if d.get("state") == "failed")
        document["state"] = "failed"
        document["error"] = f"Job {failed.get('name')} failed: {failed.get('reason') or 'unknown reason'}"
    elif "unknown" in states:  # a Job gone without its outcome recorded: nothing will change it now
        lost = next(d for d in jobs if d.get("state") == "unknown")
        document["state"] = "unknown"
        document["error"] = f"Job {lost.get('name')}: {lost.get('reason') or 'its outcome is not known'}"
    elif jobs and all(s == "succeeded" for s in states):
        document["state"] = "succeeded"
    elif any(s in ("running", "succeeded") for s in states):
        document["state"] = "running"
    else:
        document["state"] = "applied"


async def wait_for_key(kv: KeyValue, key: str, done: Callable[[dict[str, Any]], bool],
                       timeout: float) -> tuple[bool, dict[str, Any] | None]:
    """Until the JSON document under `key` satisfies `done`, or the timeout: a key watch, no polling.

    Returns whether it got there, and the last document seen (None if there is none). Shared by
    request and run waits.
    """
    watcher = await kv.watch(key)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: dict[str, Any] | None = None
    try:
        while (remaining := deadline - loop.time()) > 0:
            try:
                entry = await watcher.updates(timeout=remaining)
            except NatsTimeoutError:
                break
            if entry is None or not entry.value:
                continue
            last = fast.loads_trusted(entry.value)
            if done(last):
                return True, last
        return False, last
    finally:
        await watcher.stop()
