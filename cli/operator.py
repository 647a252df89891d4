"""The operator commands of the CLI: publish, status, replay and dead letters, printed for people.

Kept apart from `main.py` (argument parsing) so each command is a plain coroutine that takes
settings and returns an exit code.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

import nats.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NoStreamResponseError, NotFoundError

from cli.connection import connect
from gitfaas import natsconn
from gitfaas.message import request_headers
from gitfaas.publishing import WAITS, ConfigurationView, too_large, wait_sentence, wait_status
from gitfaas.replay import ReplayError, dead_letter, dead_letters, purge_dead, redrive, replay_request, replay_topic
from gitfaas.settings import Settings
from gitfaas.status import StatusStore
from gitfaas.subjects import CONFIG_BUCKET, CONFIG_KEY, InvalidName, Subjects, check_topic, new_request_id
from gitfaas.timespec import parse_since

PUBLISH_TIMEOUT_SECONDS = 5.0


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


async def replay(settings: Settings, request_id: str | None, topic: str | None, since: str | None,
                 failed: bool, out: TextIO = sys.stdout) -> int:
    nc = await connect(settings)
    try:
        js = nc.jetstream()
        _config, requests = await natsconn.ensure_buckets(js, settings)
        store = StatusStore(requests)
        if request_id:
            from gitfaas.runs import AmbiguousId, RunStore, UnknownId, ensure_runs_bucket, find_request

            try:  # an id, or a unique prefix of at least 8 characters
                request_id = (await find_request(store, RunStore(await ensure_runs_bucket(js, settings), nc),
                                                 request_id)).request_id
            except AmbiguousId as exc:
                print(f"gitfaas: {exc}", file=sys.stderr)
                return 1
            except UnknownId:
                pass  # replay_request says what is missing
            try:
                done = [await replay_request(js, store, settings, request_id)]
            except ReplayError as exc:
                print(f"gitfaas: {exc}", file=sys.stderr)
                return 1
        else:
            assert topic is not None
            done = await replay_topic(js, store, settings, topic, parse_since(since or "1h", "--since"), failed)
        for item in done:
            print(f"replayed {item.parent} -> {item.request_id} (topic {item.topic}, seq {item.stream_seq})", file=out)
        if not done:
            print("nothing to replay", file=out)
        return 0
    finally:
        await nc.close()


async def dead(settings: Settings, action: str, seq: int | None, all_: bool, as_json: bool,
               out: TextIO = sys.stdout, confirm: Callable[[int], bool] | None = None) -> int:
    """`confirm(count)` is asked before a purge (None: no question, as with `--yes`)."""
    nc = await connect(settings)
    try:
        js = nc.jetstream()
        await natsconn.ensure_stream(js, natsconn.dead_stream_config(settings))
        if action == "list":
            letters = await dead_letters(js, settings)
            if as_json:
                print(json.dumps([{"seq": d.seq, "topic": d.topic, "request_id": d.request_id,
                                   "age_seconds": d.age_seconds(), "attempts": d.attempts, "error": d.error}
                                  for d in letters], indent=2), file=out)
                return 0
            if not letters:
                print("no dead letters", file=out)
                return 0
            print(f"{'SEQ':>6}  {'TOPIC':<24} {'AGE':>5}  {'TRIES':>5}  ERROR", file=out)
            for d in letters:
                print(f"{d.seq:>6}  {d.topic:<24} {_age(d.age_seconds()):>5}  {d.attempts:>5}  {d.error}", file=out)
            return 0
        if action == "show":
            if seq is None:
                print("gitfaas: dead show needs SEQ", file=sys.stderr)
                return 2
            try:
                d = await dead_letter(js, settings, seq)
            except ReplayError as exc:
                print(f"gitfaas: {exc}", file=sys.stderr)
                return 1
            print(f"seq:        {d.seq}\ntopic:      {d.topic}\nrequest:    {d.request_id}\n"
                  f"age:        {_age(d.age_seconds())}\nattempts:   {d.attempts}\nerror:      {d.error}\n"
                  "headers:", file=out)
            for key, value in sorted(d.headers.items()):
                print(f"  {key}: {value}", file=out)
            print("body:", file=out)
            print("  " + d.data.decode("utf-8", errors="replace"), file=out)
            return 0
        if action == "redrive":
            if seq is None and not all_:
                print("gitfaas: dead redrive needs SEQ or --all", file=sys.stderr)
                return 2
            seqs = [d.seq for d in await dead_letters(js, settings)] if all_ else [seq]
            for one in seqs:
                try:
                    item = await redrive(js, settings, int(one))  # type: ignore[arg-type]
                except ReplayError as exc:
                    print(f"gitfaas: {exc}", file=sys.stderr)
                    return 1
                print(f"redriven dead letter {one}: {item.parent} -> {item.request_id} (topic {item.topic})",
                      file=out)
            if not seqs:
                print("no dead letters", file=out)
            return 0
        if action == "purge":
            waiting = len(await dead_letters(js, settings))
            if not waiting:
                print("no dead letters", file=out)
                return 0
            if confirm is not None and not confirm(waiting):
                print("gitfaas dead purge: nothing purged", file=sys.stderr)
                return 1
            count = await purge_dead(js, settings)
            print(f"purged {count} dead letter(s)", file=out)
            return 0
        print(f"gitfaas: unknown dead action {action!r}", file=sys.stderr)
        return 2
    finally:
        await nc.close()


async def _configuration(js: JetStreamContext) -> ConfigurationView:
    """The configuration in use, read from the `gitfaas_config` bucket as the bridge reads it."""
    try:
        entry = await (await js.key_value(CONFIG_BUCKET)).get(CONFIG_KEY)
    except (BucketNotFoundError, KeyNotFoundError, NotFoundError):
        return ConfigurationView(None)  # no consumer has ever loaded a configuration on this NATS
    return ConfigurationView(json.loads(entry.value) if entry.value else None)


def _nats_failure(settings: Settings, exc: BaseException) -> str:
    """One line for a NATS failure after connecting: what did not happen, and why."""
    if isinstance(exc, NoStreamResponseError):
        return (f"no JetStream stream stores the topic's subject on {natsconn.display_servers(settings)} "
                f"(stream {settings.stream} is created when the bridge or the consumer starts); nothing was published")
    if isinstance(exc, TimeoutError):
        return f"NATS did not answer in time ({type(exc).__name__}); the message may not have been stored"
    return f"NATS error: {exc or type(exc).__name__}"


async def publish(settings: Settings, topic: str, data: bytes, params: list[tuple[str, str]], wait: str | None,
                  timeout: float, out: TextIO = sys.stdout) -> int:
    """Publish like the bridge does, straight to JetStream: the same refusals and the same waits.

    Exit code 0: stored (and with `wait`, the awaited state reached); 1: refused (unknown topic,
    missing parameter, body too large, no configuration), NATS failed, or the request ended
    failed, dead or cancelled; 2: a bad topic or parameter name; 3: `wait` timed out.
    """
    try:
        check_topic(topic)
        request_id = new_request_id()
        headers = request_headers(request_id, params)
    except InvalidName as exc:
        print(f"gitfaas publish: {exc}", file=sys.stderr)
        return 2
    if wait is not None and wait not in (*WAITS, "run"):
        print(f"gitfaas publish: --wait takes {', '.join(WAITS)} or run, not {wait!r}", file=sys.stderr)
        return 2
    if len(data) > settings.max_payload_bytes:
        print(f"gitfaas publish: {too_large(settings.max_payload_bytes)}", file=sys.stderr)
        return 1
    nc = await connect(settings)
    try:
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT_SECONDS)
        refusal = (await _configuration(js)).refusal(topic, {name for name, _ in params})
        if refusal is not None:
            print(f"gitfaas publish: {refusal.error}", file=sys.stderr)
            return 1
        ack = await js.publish(Subjects(settings.subject_prefix).topic(topic), data, headers=headers,
                               stream=settings.stream, timeout=PUBLISH_TIMEOUT_SECONDS)
        print(json.dumps({"request_id": request_id, "topic": topic, "stream_seq": ack.seq,
                          "duplicate": bool(ack.duplicate)}), file=out)
        if wait is None:
            return 0
        _config, requests = await natsconn.ensure_buckets(js, settings)
        if wait == "run":
            reached, document = await _wait_run(nc, js, settings, StatusStore(requests), request_id, timeout, out)
        else:
            reached, document = await StatusStore(requests).wait(request_id, WAITS[wait], timeout)
        if document is not None and wait != "run":
            print_status(document, out)
        code = wait_status(reached, document)
        sentence = wait_sentence(wait, code, document, timeout)
        if sentence:
            print(f"gitfaas publish: {sentence}", file=sys.stderr)
        return {200: 0, 422: 1}.get(code, 3)
    except (nats.errors.Error, TimeoutError) as exc:
        print(f"gitfaas publish: {_nats_failure(settings, exc)}", file=sys.stderr)
        return 1
    finally:
        await nc.close()


async def _wait_run(nc: Client, js: JetStreamContext, settings: Settings, store: StatusStore, request_id: str,
                    timeout: float, out: TextIO) -> tuple[bool, dict[str, Any] | None]:
    """`--wait run`: until the run this request belongs to is finished; prints the run."""
    from cli.runs import print_run_tree
    from gitfaas.runs import RunStore, ensure_runs_bucket, is_run_finished, run_view

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    known, document = await store.wait(request_id, lambda d: bool(d.get("root")), timeout)
    if not known or document is None:
        return False, document
    runs = RunStore(await ensure_runs_bucket(js, settings), nc)
    reached, run = await runs.wait(document["root"], is_run_finished, max(0.001, deadline - loop.time()))
    if run is None:
        return False, {"request_id": request_id, "state": "running"}
    view = await run_view(store, run)
    print_run_tree(view, out)
    return reached, {**view, "request_id": view["run_id"]}


def print_status(document: dict[str, Any], out: TextIO, indent: str = "") -> None:
    line = (f"{indent}{document.get('request_id')}  {document.get('state', '?'):<9} topic {document.get('topic')}"
            f"  seq {document.get('stream_seq')}  attempts {document.get('attempts')}")
    print(line, file=out)
    if not indent:
        print(f"  commit   {document.get('commit') or '-'}\n  parent   {document.get('parent') or '-'}", file=out)
    if document.get("error"):
        print(f"{indent}  error    {document['error']}", file=out)
    for entry in document.get("documents", []):
        where = f"{entry.get('namespace')}/{entry.get('name')}" if entry.get("namespace") else entry.get("name")
        reason = f"  ({entry['reason']})" if entry.get("reason") else ""
        print(f"{indent}  {entry.get('kind')} {where}  {entry.get('state')}{reason}", file=out)
    responses = [r for r in document.get("responses", []) if r is not None]
    if responses and not indent:
        print(f"  responses {json.dumps(document.get('responses'))}", file=out)


async def status(settings: Settings, request_id: str, as_json: bool, tree: bool,
                 out: TextIO = sys.stdout) -> int:
    from cli.runs import print_run_tree
    from gitfaas.runs import AmbiguousId, RunStore, UnknownId, ensure_runs_bucket, find_request, find_run, run_view

    nc = await connect(settings)
    try:
        js = nc.jetstream()
        _config, requests = await natsconn.ensure_buckets(js, settings)
        store = StatusStore(requests)
        runs = RunStore(await ensure_runs_bucket(js, settings), nc)
        try:  # an id, or a unique prefix of at least 8 characters
            found = await find_request(store, runs, request_id)
        except (UnknownId, AmbiguousId) as exc:
            print(f"gitfaas status: {exc}", file=sys.stderr)
            return 1
        document = found.document
        if tree:  # the whole run the request belongs to, with its timestamps (§11)
            try:
                view = await run_view(store, await find_run(store, runs, found.request_id))
            except UnknownId:
                view = None  # recorded before runs were kept: follow the children instead
            if view is not None:
                if as_json:
                    print(json.dumps(view, indent=2), file=out)
                else:
                    print_run_tree(view, out)
                return 0
        if tree:
            document = await _with_children(store, document, depth=0)
        if as_json:
            print(json.dumps(document, indent=2), file=out)
        else:
            _print_tree(document, out, "")
        return 0
    finally:
        await nc.close()


async def _with_children(store: StatusStore, document: dict[str, Any], depth: int) -> dict[str, Any]:
    """The lineage below a request, as nested documents (bounded, in case of a cycle)."""
    if depth >= 20:
        return document
    nested = []
    for child_id in document.get("children", []):
        child = await store.get(child_id)
        nested.append(await _with_children(store, child, depth + 1) if child else {"request_id": child_id,
                                                                                     "state": "expired"})
    return {**document, "children": nested}


def _print_tree(document: dict[str, Any], out: TextIO, indent: str) -> None:
    print_status(document, out, indent)
    for child in document.get("children", []):
        if isinstance(child, dict):
            _print_tree(child, out, indent + "  └─ " if not indent else "     " + indent)
        elif not indent:
            print(f"  child    {child}", file=out)
