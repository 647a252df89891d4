"""Runs (§11): a root request and every request published under it through `Gitfaas-Parent`.

The run index is the key-value bucket `gitfaas_runs`, kept by the consumer beside the status
documents of `gitfaas_requests`:

- `run.<first 8 characters>.<run id>`: the run's document: its state, timestamps, and one small
  entry per request of the run (state, parent, topic), so the run's state is known without reading
  its requests' documents;
- `req.<first 8 characters>.<request id>`: for a request below a root, which run it belongs to.

Keys carry the first 8 characters of the id as a token of their own, so a prefix (§11: at least 8
characters) is found by a subject filter the server applies, never by reading every key. Listing
(`GET /runs`, `gitfaas runs`) reads the bucket's stream backwards with batched direct gets (the
bucket's stream allows direct gets): the runs most recently started or changed come first, and a
call reads about as many entries as it returns, whatever the number of stored requests
(`bench/b7_runs.py` measures it at 100,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue

from gitfaas import fast
from gitfaas.jspublish import EXPECTED_LAST_SUBJECT_SEQUENCE
from gitfaas.settings import Settings
from gitfaas.status import KeyTurns, StatusStore, is_request_id, is_wrong_last_sequence, wait_for_key

RUNS_BUCKET = "gitfaas_runs"
RUNS_STREAM = f"KV_{RUNS_BUCKET}"
RUN_STATES = ("running", "succeeded", "failed", "cancelled")
FINISHED_RUN_STATES = frozenset({"succeeded", "failed", "cancelled"})
# A request in one of these will not change any more (`unknown`: its Job's outcome was lost).
FINAL_REQUEST_STATES = frozenset({"succeeded", "failed", "dead", "cancelled", "unknown"})
FAILED_REQUEST_STATES = frozenset({"failed", "dead", "unknown"})
MIN_PREFIX = 8  # a prefix this long (or longer) stands for the one id it starts
MAX_RUN_REQUESTS = 2000  # entries a run document lists; more are counted (the document must fit in NATS)
MAX_CANDIDATES = 10
DEFAULT_LIST_LIMIT = 50
MAX_LIST_LIMIT = 1000
MAX_LIST_SCAN = 20_000  # index entries one listing reads at most (filters that match little stop there)
CANCELLED_ERROR = "cancelled: the run was cancelled"


def control_cancel(prefix: str) -> str:
    """Where a cancel is announced to the consumers: they delete the run's active Jobs."""
    return f"{prefix}.control.cancel"


def control_logs(prefix: str) -> str:
    """Where the bridge and the CLI ask a consumer for the output of Jobs (request-reply)."""
    return f"{prefix}.control.logs"


def run_key(run_id: str) -> str:
    return f"run.{run_id[:MIN_PREFIX]}.{run_id}"


def pointer_key(request_id: str) -> str:
    return f"req.{request_id[:MIN_PREFIX]}.{request_id}"


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def seconds_between(start: str | None, end: str | None) -> float | None:
    a, b = parse_time(start), parse_time(end)
    return None if a is None or b is None else round(max(0.0, (b - a).total_seconds()), 3)


# ---- the run document ------------------------------------------------------------------------


def new_run(run_id: str, topic: str, started_at: str | None) -> dict[str, Any]:
    return {"run_id": run_id, "topic": topic, "state": "running", "started_at": started_at, "finished_at": None,
            "steps": 0, "failed_step": None, "cancelled": False, "unhandled_children": 0,
            "requests": {}, "requests_omitted": 0}


def is_request_finished(document: Mapping[str, Any]) -> bool:
    """Nothing more will happen to this request: it ended, or was applied and has no Job to wait for."""
    state = document.get("state")
    if state in FINAL_REQUEST_STATES:
        return True
    return state == "applied" and not any(d.get("kind") == "Job" for d in document.get("documents") or [])


def entry_of(document: Mapping[str, Any]) -> dict[str, Any]:
    """What a run keeps of one of its requests (enough to know the run's state)."""
    entry: dict[str, Any] = {"topic": document.get("topic"), "parent": document.get("parent"),
                             "state": document.get("state"), "done": is_request_finished(document)}
    if document.get("state") in FAILED_REQUEST_STATES:
        entry["error"] = str(document.get("error") or "")[:300]
        # A failed request whose topic re-runs it (`retries`): its re-run, a child of it, decides.
        if document.get("rerun"):
            entry["superseded"] = True
    if document.get("retry"):
        entry["retry"] = document.get("retry")
    return entry


def set_entry(run: dict[str, Any], request_id: str, entry: dict[str, Any]) -> bool:
    """Put a request's entry in the run; False when it was already there unchanged."""
    entries = run.setdefault("requests", {})
    if entries.get(request_id) == entry:
        return False
    if request_id not in entries and len(entries) >= MAX_RUN_REQUESTS:
        run["requests_omitted"] = int(run.get("requests_omitted") or 0) + 1
    else:
        entries[request_id] = entry
    run["steps"] = len(entries) + int(run.get("requests_omitted") or 0)
    return True


def all_done(run: Mapping[str, Any]) -> bool:
    return all(entry.get("done") for entry in (run.get("requests") or {}).values())


def evaluate(run: dict[str, Any], now: str) -> None:
    """The run's state from its entries: `running` while any request is unfinished or a child
    published by one of its Jobs has not been handled; then `failed` (naming the first failed
    step), `succeeded`, or `cancelled`."""
    before = run.get("state")
    run["updated_at"] = now  # listing stops at the first run last changed before its `since`
    entries: dict[str, dict[str, Any]] = run.get("requests") or {}
    if run.get("cancelled"):
        state = "cancelled"
    elif not all_done(run) or run.get("unhandled_children"):
        state = "running"
    else:
        failed = next(((rid, e) for rid, e in entries.items()
                       if e.get("state") in FAILED_REQUEST_STATES and not e.get("superseded")), None)
        state = "failed" if failed else "succeeded"
        run["failed_step"] = None if failed is None else {
            "request_id": failed[0], "topic": failed[1].get("topic"), "state": failed[1].get("state"),
            "error": failed[1].get("error")}
    if state == "running":
        run["failed_step"] = None
    run["state"] = state
    if state in FINISHED_RUN_STATES:
        if before not in FINISHED_RUN_STATES or not run.get("finished_at"):
            run["finished_at"] = now
    else:
        run["finished_at"] = None


def summary(run: Mapping[str, Any]) -> dict[str, Any]:
    """One row of `GET /runs`."""
    return {"run_id": run.get("run_id"), "topic": run.get("topic"), "state": run.get("state"),
            "started_at": run.get("started_at"), "finished_at": run.get("finished_at"),
            "duration_seconds": seconds_between(run.get("started_at"), run.get("finished_at")),
            "steps": run.get("steps", len(run.get("requests") or {})),
            "failed_step": run.get("failed_step")}


def tree_order(run_id: str, entries: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The run's request ids, parents before their children (depth first, in arrival order)."""
    children: dict[str | None, list[str]] = {}
    for rid, entry in entries.items():
        if rid != run_id:
            parent = entry.get("parent")
            children.setdefault(parent if parent in entries else run_id, []).append(rid)
    order: list[str] = []
    seen: set[str] = set()
    stack = [run_id] if run_id in entries else []
    while stack:
        rid = stack.pop()
        if rid in seen:
            continue
        seen.add(rid)
        order.append(rid)
        stack.extend(reversed(children.get(rid, [])))
    order.extend(rid for rid in entries if rid not in seen)
    return order


# ---- the bucket ------------------------------------------------------------------------------


async def ensure_runs_bucket(js: JetStreamContext, settings: Settings) -> KeyValue:
    """The runs bucket, created with direct gets allowed (listing reads it in batches)."""
    config = StreamConfig(
        name=RUNS_STREAM, subjects=[f"$KV.{RUNS_BUCKET}.>"], retention=RetentionPolicy.LIMITS,
        max_msgs_per_subject=1, max_age=settings.request_ttl_seconds, storage=StorageType.FILE,
        discard=DiscardPolicy.NEW, num_replicas=settings.replicas, allow_rollup_hdrs=True, deny_delete=True,
        allow_direct=True, max_msg_size=-1)
    try:
        await js.stream_info(RUNS_STREAM)
    except NotFoundError:
        try:
            await js.add_stream(config)
        except BadRequestError:  # created meanwhile by another service
            pass
    return await js.key_value(RUNS_BUCKET)


async def direct_batch(nc: Client, stream: str, *, seq: int = 1, batch: int, subject: str | None = None,
                       multi_last: list[str] | None = None, timeout: float = 5.0) -> list[Msg]:
    """Up to `batch` stored messages from `seq` on (only those on `subject` when given), or the last
    message of each subject matching `multi_last`, in one request: JetStream's batched direct get
    (the stream must allow direct gets)."""
    if batch <= 0:
        return []
    found: list[Msg] = []
    over = asyncio.get_running_loop().create_future()

    async def collect(msg: Msg) -> None:
        if over.done():
            return
        if (msg.headers or {}).get("Status"):  # 204 end of batch, 404 nothing there, 408 ...: the batch is over
            over.set_result(None)
            return
        found.append(msg)
        if len(found) >= batch:
            over.set_result(None)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    request: dict[str, Any] = {"batch": batch}
    if multi_last:
        request["multi_last"] = multi_last
    else:
        request["seq"] = max(1, seq)
    if subject:
        request["next_by_subj"] = subject
    try:
        await nc.publish(f"$JS.API.DIRECT.GET.{stream}", json.dumps(request).encode(), reply=inbox)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(over, timeout)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    return found


def _sequence(msg: Msg) -> int:
    try:
        return int((msg.headers or {}).get("Nats-Sequence", "0"))
    except ValueError:
        return 0


def _timestamp(msg: Msg) -> datetime | None:
    return parse_time((msg.headers or {}).get("Nats-Time-Stamp"))


class UnknownId(LookupError):
    """No request or run has this id (nor starts with it); the message says so."""


class AmbiguousId(LookupError):
    """A prefix that starts several ids; the message names them."""

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        self.candidates = candidates
        shown = ", ".join(candidates[:MAX_CANDIDATES - 1]) + (", …" if len(candidates) >= MAX_CANDIDATES else "")
        super().__init__(f"id prefix {prefix} is ambiguous: it starts {shown}; give more characters")


class RunStore:
    """Run documents (read-modify-write with the revision as guard, like `StatusStore`), the pointers
    from requests to their runs, prefixes, and listing."""

    def __init__(self, kv: KeyValue, nc: Client, max_bytes: int | None = None) -> None:
        self.kv = kv
        self.nc = nc
        self.max_bytes = max_bytes
        self._turn = KeyTurns()

    async def _entry(self, key: str) -> tuple[dict[str, Any] | None, int | None]:
        try:
            entry = await self.kv.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None, None
        if not entry.value:
            return None, entry.revision
        return fast.loads_trusted(entry.value), entry.revision

    async def get(self, run_id: str) -> dict[str, Any] | None:
        if not is_request_id(run_id):
            return None
        return (await self._entry(run_key(run_id)))[0]

    async def get_with_revision(self, run_id: str) -> tuple[dict[str, Any] | None, int | None]:
        return await self._entry(run_key(run_id))

    def _encode(self, document: Mapping[str, Any]) -> bytes:
        payload = fast.dumps(document)  # orjson when installed: one run document per message (bench B2)
        if self.max_bytes and len(payload) + 256 > self.max_bytes:
            raise ValueError(f"the run document of {document.get('run_id')} would be larger than NATS accepts")
        return payload

    async def write(self, run_id: str, document: Mapping[str, Any], revision: int | None) -> bool:
        """Create (revision None) or update at `revision`; False when another writer was first."""
        try:
            if revision is None:
                await self.kv.create(run_key(run_id), self._encode(document))
            else:
                await self.kv.update(run_key(run_id), self._encode(document), last=revision)
        except Exception as exc:
            if is_wrong_last_sequence(exc):
                return False
            raise
        return True

    async def create_quietly(self, run_id: str, document: Mapping[str, Any]) -> bool:
        """Create the run's document without waiting for JetStream's answer (bench B2: one round trip and
        most of the client's work less per message). Stored only if the key does not exist yet; a later
        update reads what is there (and creates it, should this one have been lost). False when it was
        not sent (too large, no connection)."""
        try:
            await self.nc.publish(f"$KV.{RUNS_BUCKET}.{run_key(run_id)}", self._encode(document),
                                  headers={EXPECTED_LAST_SUBJECT_SEQUENCE: "0"})
        except Exception:  # noqa: BLE001 — the caller writes it the usual way
            return False
        return True

    async def update(self, run_id: str, change: Callable[[dict[str, Any]], bool | None],
                     create: Callable[[], dict[str, Any]] | None = None, attempts: int = 10
                     ) -> dict[str, Any] | None:
        """`change` edits the document and returns False when there is nothing to write."""
        async with self._turn(run_key(run_id)):
            return await self._update(run_id, change, create, attempts)

    async def _update(self, run_id: str, change: Callable[[dict[str, Any]], bool | None],
                      create: Callable[[], dict[str, Any]] | None, attempts: int) -> dict[str, Any] | None:
        for _ in range(attempts):
            document, revision = await self.get_with_revision(run_id)
            if document is None:
                if create is None:
                    return None
                document, revision = create(), None
            if change(document) is False:
                return document
            if await self.write(run_id, document, revision):
                return document
        raise RuntimeError(f"run {run_id} kept changing under us; update not stored")

    async def root_of(self, request_id: str) -> str | None:
        """The run a request below a root belongs to, from its pointer."""
        if not is_request_id(request_id):
            return None
        document, _ = await self._entry(pointer_key(request_id))
        return None if document is None else document.get("root")

    async def add_pointer(self, request_id: str, root: str) -> None:
        with contextlib.suppress(KeyWrongLastSequenceError):
            try:
                await self.kv.create(pointer_key(request_id), json.dumps({"root": root}).encode())
            except Exception as exc:
                if not is_wrong_last_sequence(exc):  # already there: nothing to do
                    raise

    async def candidates(self, prefix: str) -> list[str]:
        """Ids (runs and requests below them) that start with `prefix` (at least 8 characters)."""
        if len(prefix) < MIN_PREFIX or not is_request_id(prefix):
            return []
        found: list[str] = []
        # The last entry of each key under the prefix's token: the server answers from its subject index.
        msgs = await direct_batch(self.nc, RUNS_STREAM, batch=256, multi_last=[
            f"$KV.{RUNS_BUCKET}.{kind}.{prefix[:MIN_PREFIX]}.>" for kind in ("run", "req")])
        for msg in msgs:
            rid = (msg.headers or {}).get("Nats-Subject", "").rsplit(".", 1)[-1]
            if rid.startswith(prefix) and rid not in found and msg.data:
                found.append(rid)
        return found

    async def list(self, *, topic: str | None = None, state: str | None = None, since: datetime | None = None,
                   limit: int = DEFAULT_LIST_LIMIT, max_scan: int = MAX_LIST_SCAN) -> list[dict[str, Any]]:
        """Recent runs, newest first: read backwards from the newest index entry until `limit` match."""
        js = self.nc.jetstream()
        info = await js.stream_info(RUNS_STREAM)
        first, end = info.state.first_seq or 1, info.state.last_seq or 0
        found: dict[str, dict[str, Any]] = {}
        window, scanned = max(64, limit * 2), 0
        subject = f"$KV.{RUNS_BUCKET}.run.>"
        while end >= first and len(found) < limit and scanned < max_scan:
            start = max(first, end - window + 1)
            msgs = await self._range(start, end, subject)
            scanned += len(msgs)
            older = False
            for msg in reversed(msgs):
                if not msg.data:
                    continue
                run = fast.loads_trusted(msg.data)
                changed = parse_time(run.get("updated_at")) or _timestamp(msg)
                if since is not None and changed is not None and changed < since:
                    older = True  # changed last before `since` (and so were all before it): started before it
                    break
                run_id = run.get("run_id")
                if not run_id or run_id in found:
                    continue
                if topic is not None and run.get("topic") != topic:
                    continue
                if state is not None and run.get("state") != state:
                    continue
                started = parse_time(run.get("started_at"))
                if since is not None and started is not None and started < since:
                    continue
                found[run_id] = summary(run)
                if len(found) >= limit:
                    break
            if older:
                break
            end = start - 1
            window = min(window * 2, 4096)
        return sorted(found.values(), key=lambda r: r.get("started_at") or "", reverse=True)

    async def _range(self, start: int, end: int, subject: str, chunk: int = 256) -> list[Msg]:
        """The entries on `subject` stored between two sequences, oldest first (batched direct gets,
        a chunk at a time: a batch runs on past `end` when there are gaps)."""
        found: list[Msg] = []
        cursor = start
        while cursor <= end:
            msgs = await direct_batch(self.nc, RUNS_STREAM, seq=cursor, batch=min(chunk, end - cursor + 1),
                                      subject=subject)
            found.extend(m for m in msgs if _sequence(m) <= end)
            if len(msgs) < min(chunk, end - cursor + 1) or not msgs or _sequence(msgs[-1]) >= end:
                break
            cursor = _sequence(msgs[-1]) + 1
        return found

    async def wait(self, run_id: str, done: Callable[[dict[str, Any]], bool], timeout: float
                   ) -> tuple[bool, dict[str, Any] | None]:
        """Until `done(run)` or the timeout, from a watch of the run's key."""
        if not is_request_id(run_id):
            return False, None
        return await wait_for_key(self.kv, run_key(run_id), done, timeout)


def is_run_finished(run: Mapping[str, Any]) -> bool:
    return run.get("state") in FINISHED_RUN_STATES


# ---- ids: exact or a prefix --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Found:
    request_id: str
    document: dict[str, Any]


async def find_request(status: StatusStore, runs: RunStore | None, given: str) -> Found:
    """The request `given` names: its exact id, or the one id it is a prefix of (at least 8
    characters). Raises `UnknownId` or `AmbiguousId` with the sentence to show."""
    document = await status.get(given)
    if document is not None:
        return Found(given, document)
    candidates = await runs.candidates(given) if runs is not None and len(given) >= MIN_PREFIX else []
    documents = [(rid, doc) for rid in candidates if (doc := await status.get(rid)) is not None]
    if len(documents) > 1:
        raise AmbiguousId(given, [rid for rid, _ in documents])
    if documents:
        return Found(*documents[0])
    short = f" (a prefix needs at least {MIN_PREFIX} characters)" if len(given) < MIN_PREFIX else ""
    raise UnknownId(f"request {given} is unknown or its status has expired{short}")


async def find_run(status: StatusStore, runs: RunStore, given: str) -> dict[str, Any]:
    """The run `given` names: a run id, the id of a request in it, or a prefix of either."""
    run = await runs.get(given)
    if run is not None:
        return run
    found = await find_request(status, runs, given)
    root = found.document.get("root") or await runs.root_of(found.request_id) or found.request_id
    run = await runs.get(root)
    if run is None:
        raise UnknownId(f"request {found.request_id} belongs to no known run (its run has expired, "
                        "or it was recorded before runs were kept)")
    return run


async def run_view(status: StatusStore, run: Mapping[str, Any]) -> dict[str, Any]:
    """`GET /runs/{id}`: the run and the status document of each of its requests, parents first."""
    entries: dict[str, Any] = run.get("requests") or {}
    order = tree_order(str(run.get("run_id")), entries)
    documents = await asyncio.gather(*(status.get(rid) for rid in order))
    requests = []
    for rid, document in zip(order, documents, strict=True):
        if document is None:
            entry = entries[rid]
            document = {"request_id": rid, "topic": entry.get("topic"), "parent": entry.get("parent"),
                        "state": "expired"}
        else:
            document = {**document, "duration_seconds": seconds_between(
                document.get("started_at") or document.get("applied_at") or document.get("published_at"),
                document.get("finished_at"))}
        requests.append(document)
    view = {key: value for key, value in summary(run).items()}
    view.update(unhandled_children=run.get("unhandled_children", 0), cancelled=bool(run.get("cancelled")),
                requests_omitted=run.get("requests_omitted", 0), requests=requests)
    return view


def job_documents(documents: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The Jobs of these status documents, in order, as `{request_id, namespace, name, state}`."""
    jobs = []
    for document in documents:
        for entry in document.get("documents") or []:
            if entry.get("kind") == "Job" and entry.get("name"):
                jobs.append({"request_id": document.get("request_id"), "namespace": entry.get("namespace"),
                             "name": entry.get("name"), "state": entry.get("state")})
    return jobs


def utc_now() -> str:
    """Now as RFC 3339 UTC, to the millisecond: how every timestamp of §11 is written.

    The text of the last millisecond is kept: the consumer asks several times per message (bench B2)."""
    now = time.time()
    millisecond = int(now * 1000)
    if _NOW[0] != millisecond:
        _NOW[:] = [millisecond, rfc3339(now)]
    return _NOW[1]


_NOW: list[Any] = [None, ""]  # the millisecond `utc_now` last formatted, and its text


_SECOND: list[Any] = [None, ""]  # the last whole second formatted, and its text


def rfc3339(seconds: float) -> str:
    """`datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")` with a Z, the same text.

    Several per message on the consumer's hot path: the date and time of the second are formatted once
    per second (rounded to the microsecond first, as datetime does, then cut to the millisecond)."""
    if not 0 <= seconds < 253402300800:  # datetime's own range checks and errors
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    fraction, whole = math.modf(seconds)
    micro = round(fraction * 1e6)
    if micro >= 1_000_000:
        whole, micro = whole + 1, micro - 1_000_000
    if _SECOND[0] != whole:
        _SECOND[:] = [whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")]
    return f"{_SECOND[1]}.{micro // 1000:03d}Z"


# ---- cancel ----------------------------------------------------------------------------------


@dataclass(slots=True)
class CancelOutcome:
    status: int  # 202 cancelled (now or before), 409 the run had already finished
    run: dict[str, Any]  # the run document as it is now
    jobs: list[dict[str, Any]]  # the Jobs that were active, handed to the consumers to delete
    deleted: list[dict[str, Any]] | None = None  # what a consumer reported deleted (None: no consumer answered)
    error: str | None = None


async def cancel_run(status: StatusStore, runs: RunStore, nc: Client, subject_prefix: str,
                     run: Mapping[str, Any], timeout: float = 10.0) -> CancelOutcome:
    """Cancel every unfinished request of the run (`cancelled`) and have a consumer delete its active
    Jobs. Idempotent: a cancelled run is answered as it is; a finished one is refused (409)."""
    run_id = str(run["run_id"])
    now = utc_now()

    def change(document: dict[str, Any]) -> bool:
        if document.get("state") in ("succeeded", "failed") or document.get("cancelled"):
            return False
        document["cancelled"] = True
        for entry in (document.get("requests") or {}).values():
            if not entry.get("done"):
                entry.update(state="cancelled", done=True)
        evaluate(document, now)
        return True

    current = await runs.update(run_id, change) or dict(run)
    if current.get("state") in ("succeeded", "failed"):
        return CancelOutcome(409, current, [], error=f"run {run_id} already finished ({current.get('state')}); "
                                                      "there is nothing to cancel")
    cancelled: list[dict[str, Any]] = []

    def cancel_request(document: dict[str, Any]) -> None:
        cancelled.clear()
        if document.get("state") in FINAL_REQUEST_STATES and document.get("state") != "cancelled":
            return
        document.update(state="cancelled", error=CANCELLED_ERROR, finished_at=document.get("finished_at") or now)
        cancelled.append(document)

    jobs: list[dict[str, Any]] = []
    for rid, entry in (current.get("requests") or {}).items():
        if entry.get("state") != "cancelled":
            continue
        document = await status.get(rid)
        if document is None or (document.get("state") == "cancelled" and document.get("finished_at")):
            if document is not None:
                jobs.extend(j for j in job_documents([document]) if j["state"] not in ("succeeded", "failed"))
            continue
        await status.update(rid, cancel_request)
        jobs.extend(j for j in job_documents(cancelled) if j["state"] not in ("succeeded", "failed"))
    outcome = CancelOutcome(202, current, jobs)
    try:
        reply = await nc.request(control_cancel(subject_prefix), json.dumps({"run_id": run_id, "jobs": jobs}).encode(),
                                 timeout=timeout)
        outcome.deleted = json.loads(reply.data).get("deleted", [])
    except Exception as exc:  # noqa: BLE001 — no consumer (or none in time): the requests are cancelled all the same
        outcome.error = (f"no consumer answered ({type(exc).__name__}): the run's requests are cancelled, but its "
                         f"{len(jobs)} active Job(s) were not deleted; cancel again once a consumer runs")
    return outcome


# ---- a reader's view of the index --------------------------------------------------------------

MAX_CACHED_RUNS = 50_000


class RunIndex:
    """The newest `MAX_CACHED_RUNS` runs' summaries, in memory, kept up to date incrementally from the
    runs bucket's stream: each listing first reads the entries written since the last one (batched
    direct gets, usually none or a few), then filters in memory. For a service answering `GET /runs`
    many times (the bridge); a listing that wants older runs than it holds falls back to the scan."""

    def __init__(self, store: RunStore, capacity: int = MAX_CACHED_RUNS) -> None:
        self.store = store
        self.capacity = capacity
        self.rows: dict[str, tuple[datetime | None, dict[str, Any]]] = {}  # run id -> (changed, summary)
        self.seq = 0  # the last stream sequence read
        self.complete = False  # holds every run of the bucket (the stream was read from its start)
        self._lock = asyncio.Lock()

    def _take(self, msg: Msg) -> None:
        if not msg.data:
            return
        run = fast.loads_trusted(msg.data)
        run_id = run.get("run_id")
        if not run_id:
            return
        self.rows.pop(run_id, None)  # re-inserted last: most recently changed last
        self.rows[run_id] = (parse_time(run.get("updated_at")) or _timestamp(msg), summary(run))
        if len(self.rows) > self.capacity:
            del self.rows[next(iter(self.rows))]
            self.complete = False

    async def refresh(self) -> None:
        subject = f"$KV.{RUNS_BUCKET}.run.>"
        async with self._lock:
            if self.seq:  # what was written since the last listing (one request in the usual case)
                while True:
                    msgs = await direct_batch(self.store.nc, RUNS_STREAM, seq=self.seq + 1, batch=1024,
                                              subject=subject)
                    for msg in msgs:
                        self._take(msg)
                    if msgs:
                        self.seq = max(self.seq, _sequence(msgs[-1]))
                    if len(msgs) < 1024:
                        return
            js = self.store.nc.jetstream()
            info = await js.stream_info(RUNS_STREAM)
            first, last = info.state.first_seq or 1, info.state.last_seq or 0
            # The first listing: the newest runs, read backwards.
            self.rows.clear()
            loaded: list[Msg] = []
            end, window = last, 1024
            while end >= first and len(loaded) < self.capacity:
                start = max(first, end - window + 1)
                loaded[:0] = await self.store._range(start, end, subject)
                end, window = start - 1, min(window * 2, 16384)
            for msg in loaded:
                self._take(msg)
            self.complete = end < first
            self.seq = last

    async def list(self, *, topic: str | None = None, state: str | None = None, since: datetime | None = None,
                   limit: int = DEFAULT_LIST_LIMIT) -> list[dict[str, Any]]:
        await self.refresh()
        found = []
        for changed, row in reversed(self.rows.values()):
            if since is not None and changed is not None and changed < since:
                break
            if (topic is not None and row.get("topic") != topic) or (state is not None and row.get("state") != state):
                continue
            started = parse_time(row.get("started_at"))
            if since is not None and started is not None and started < since:
                continue
            found.append(row)
            if len(found) >= limit:
                break
        if len(found) < limit and not self.complete and len(self.rows) >= self.capacity:
            return await self.store.list(topic=topic, state=state, since=since, limit=limit)
        return sorted(found, key=lambda r: r.get("started_at") or "", reverse=True)
