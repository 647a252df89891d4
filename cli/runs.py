"""`gitfaas runs`, `gitfaas logs`, `gitfaas cancel` (§11): runs for people, straight from NATS.

Ids may be a unique prefix of at least 8 characters, as everywhere; the Jobs' output is read by a
consumer (the executor that ran them knows where it is) over `gitfaas.control.logs`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime
from typing import Any, TextIO

import nats.errors

from cli.connection import connect
from gitfaas import natsconn
from gitfaas.runs import (
    AmbiguousId,
    RunStore,
    UnknownId,
    cancel_run,
    control_logs,
    ensure_runs_bucket,
    find_request,
    find_run,
    is_run_finished,
    job_documents,
    parse_time,
    run_view,
    seconds_between,
)
from gitfaas.settings import Settings
from gitfaas.status import StatusStore

FOLLOW_SECONDS = 1.0


async def _stores(nc: Any, settings: Settings) -> tuple[StatusStore, RunStore]:
    js = nc.jetstream()
    _config, requests = await natsconn.ensure_buckets(js, settings)
    runs_kv = await ensure_runs_bucket(js, settings)
    return StatusStore(requests), RunStore(runs_kv, nc)


def when(text: str | None) -> str:
    moment = parse_time(text)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def running_for(started: str | None) -> float | None:
    start = parse_time(started)
    return None if start is None else max(0.0, datetime.now(start.tzinfo).timestamp() - start.timestamp())


async def runs(settings: Settings, topic: str | None, state: str | None, since: datetime | None, limit: int,
               as_json: bool, out: TextIO = sys.stdout) -> int:
    nc = await connect(settings)
    try:
        _status, store = await _stores(nc, settings)
        rows = await store.list(topic=topic, state=state, since=since, limit=limit)
    finally:
        await nc.close()
    if as_json:
        print(json.dumps({"runs": rows}, indent=2), file=out)
        return 0
    if not rows:
        print("no runs", file=out)
        return 0
    print(f"{'RUN':<36}  {'TOPIC':<20} {'STATE':<9}  {'STARTED (UTC)':<19}  {'DURATION':>9}  STEPS", file=out)
    for row in rows:
        took = row.get("duration_seconds")
        shown = duration(took) if took is not None else f"{duration(running_for(row.get('started_at')))}…"
        print(f"{row['run_id']:<36}  {str(row.get('topic'))[:20]:<20} {row.get('state'):<9}  "
              f"{when(row.get('started_at')):<19}  {shown:>9}  {row.get('steps')}", file=out)
    return 0


async def cancel(settings: Settings, given: str, out: TextIO = sys.stdout) -> int:
    """0 cancelled (now, or it was already); 1 the run had finished, or is unknown."""
    nc = await connect(settings)
    try:
        status, store = await _stores(nc, settings)
        try:
            run = await find_run(status, store, given)
        except (UnknownId, AmbiguousId) as exc:
            print(f"gitfaas cancel: {exc}", file=sys.stderr)
            return 1
        outcome = await cancel_run(status, store, nc, settings.subject_prefix, run)
    finally:
        await nc.close()
    if outcome.status == 409:
        print(f"gitfaas cancel: {outcome.error}", file=sys.stderr)
        return 1
    jobs = outcome.deleted if outcome.deleted is not None else []
    print(f"run {outcome.run['run_id']} cancelled ({outcome.run.get('steps')} step(s)); "
          f"Jobs deleted: {', '.join(j['name'] for j in jobs) or 'none active'}", file=out)
    if outcome.error:
        print(f"gitfaas cancel: {outcome.error}", file=sys.stderr)
    return 0


async def _read(nc: Any, settings: Settings, jobs: list[dict[str, Any]], after: dict[str, int]
                ) -> tuple[list[dict[str, Any]], str | None]:
    request = {"jobs": [{"namespace": j.get("namespace"), "name": j["name"]} for j in jobs], "after": after}
    try:
        reply = await nc.request(control_logs(settings.subject_prefix), json.dumps(request).encode(), timeout=15)
    except nats.errors.NoRespondersError:
        return [], "no consumer is running to read the Jobs' output"
    except (TimeoutError, nats.errors.TimeoutError):
        return [], "no consumer answered in time"
    answer = json.loads(reply.data)
    found = answer.get("jobs") or []
    return found, (answer.get("error") if not any(j.get("lines") for j in found) else None)


async def logs(settings: Settings, given: str, whole_run: bool, follow: bool, out: TextIO = sys.stdout) -> int:
    nc = await connect(settings)
    try:
        status, store = await _stores(nc, settings)
        try:
            found = await find_request(status, store, given)
        except (UnknownId, AmbiguousId) as exc:
            print(f"gitfaas logs: {exc}", file=sys.stderr)
            return 1
        seen: dict[str, int] = {}
        while True:
            if whole_run:
                run = await find_run(status, store, found.request_id)
                view = await run_view(status, run)
                documents, finished = view["requests"], is_run_finished(run)
            else:
                document = await status.get(found.request_id) or found.document
                documents = [document]
                finished = bool(document.get("finished_at")) or document.get("state") in ("dead", "cancelled")
            jobs = job_documents(documents)
            answers, error = await _read(nc, settings, jobs, seen)
            for job in answers:
                for line in job.get("lines") or []:
                    print(line, file=out)
                seen[job["name"]] = int(job.get("total") or 0)
            out.flush()
            if error and not follow:
                print(f"gitfaas logs: {error}", file=sys.stderr)
                return 1
            if not follow or finished:
                return 0
            await asyncio.sleep(FOLLOW_SECONDS)
    finally:
        await nc.close()


def print_run_tree(view: dict[str, Any], out: TextIO) -> None:
    """`gitfaas status ID --tree`: the run, then each request under its parent, with times."""
    took = view.get("duration_seconds")
    how_long = f"took {duration(took)}" if took is not None else \
        f"running for {duration(running_for(view.get('started_at')))}"
    print(f"run {view['run_id']}  {view.get('state')}  started {when(view.get('started_at'))}  {how_long}"
          f"  steps {view.get('steps')}", file=out)
    if view.get("failed_step"):
        step = view["failed_step"]
        print(f"  failed step  {step.get('request_id')} ({step.get('topic')}): {step.get('error')}", file=out)
    if view.get("unhandled_children"):
        print(f"  waiting for {view['unhandled_children']} message(s) published by its Jobs", file=out)
    depth: dict[str, int] = {}
    for document in view.get("requests") or []:
        rid = document["request_id"]
        level = depth.get(document.get("parent") or "", -1) + 1 if document.get("parent") in depth else 0
        depth[rid] = level
        indent = "  " + "   " * level + ("└─ " if level else "")
        took = seconds_between(document.get("started_at") or document.get("applied_at") or document.get("published_at"),
                               document.get("finished_at"))
        print(f"{indent}{rid}  {document.get('state', '?'):<9} {document.get('topic')}  "
              f"published {when(document.get('published_at'))}  "
              f"applied {when(document.get('applied_at'))}  finished {when(document.get('finished_at'))}"
              f"  ({duration(took)})", file=out)
        pad = " " * (len(indent) + 2)
        if document.get("error"):
            print(f"{pad}error {document['error']}", file=out)
        for entry in document.get("documents") or []:
            reason = f"  ({entry['reason']})" if entry.get("reason") else ""
            print(f"{pad}{entry.get('kind')} {entry.get('name')}  {entry.get('state')}{reason}", file=out)
