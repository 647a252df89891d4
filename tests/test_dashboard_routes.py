"""Issue 16: the routes behind the dashboard, without a browser (these run everywhere).

Dead letters over HTTP, `/stats`, the live event streams, the dashboard's files and their headers,
and what `BRIDGE_TOKEN` leaves open (the files) and closes (every piece of data).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from bridge.app import Bridge, serve
from gitfaas.embedded import EmbeddedNats, free_port
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for


@pytest.fixture
async def dry(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Stack]:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json({"hello": ["hello.yaml"]}), "hello.yaml": job_manifest("hello")})
    async with running_stack(make_settings(nats_server, None, repo.path, tmp_path)) as stack:
        yield stack


async def dead_letter(stack: Stack, topic: str, body: bytes) -> int:
    nc = await nats.connect(stack.settings.nats_url)
    try:
        ack = await nc.jetstream().publish(f"gitfaas.topics.{topic}", body)
    finally:
        await nc.close()

    async def arrived() -> int | None:
        _, listed = await stack.get_json("/dead-letters")
        found = [d["seq"] for d in listed["dead_letters"] if d["request_id"] == f"seq-{ack.seq}"]
        return found[0] if found else None

    return int(await wait_for(arrived, timeout=15, message=f"the dead letter of stream message {ack.seq}"))


async def test_dead_letters_are_listed_shown_redriven_and_purged_over_http(dry: Stack) -> None:
    first = await dead_letter(dry, "nowhere", b"<b>one</b>" + b"x" * 5000)
    second = await dead_letter(dry, "hello.not.here", b"two")

    code, listed = await dry.get_json("/dead-letters")
    assert code == 200 and listed["count"] == 2
    assert [(d["seq"], d["topic"]) for d in listed["dead_letters"]] == [(first, "nowhere"), (second, "hello.not.here")]
    assert "is not in the configuration" in listed["dead_letters"][0]["error"]
    code, limited = await dry.get_json("/dead-letters?limit=1")
    assert code == 200 and len(limited["dead_letters"]) == 1 and limited["count"] == 2

    code, shown = await dry.get_json(f"/dead-letters/{first}")
    assert code == 200 and shown["body_preview"].startswith("<b>one</b>") and len(shown["body_preview"]) == 4096
    assert shown["body_truncated"] is True and shown["body_bytes"] == 5010
    assert shown["headers"]["Gitfaas-Error"] == shown["error"]
    assert (await dry.get_json("/dead-letters/999999"))[0] == 404

    # A page of another site cannot make a browser post here.
    async with dry.http.post(f"{dry.bridge_url}/dead-letters/{second}/redrive",
                             headers={"Origin": "https://evil.example"}) as response:
        assert response.status == 403
    async with dry.http.post(f"{dry.bridge_url}/dead-letters/purge", headers={"Sec-Fetch-Site": "cross-site"}) as r:
        assert r.status == 403

    async with dry.http.post(f"{dry.bridge_url}/dead-letters/{second}/redrive",
                             headers={"Origin": dry.bridge_url}) as response:
        redriven = await response.json()
        assert response.status == 202, redriven
    assert redriven["seq"] == second and redriven["topic"] == "hello.not.here" and redriven["parent"].startswith("seq-")
    async with dry.http.post(f"{dry.bridge_url}/dead-letters/{second}/redrive") as response:
        assert response.status == 404  # gone from the dead letters once redriven
    # The redriven message goes dead again (its topic is still unknown): a new letter, after `first`.
    await wait_for(lambda: _count(dry, 2), timeout=15, message="the redriven message to go dead again")

    # Purge up to what was seen: a letter that arrives later is kept.
    _, listed = await dry.get_json("/dead-letters")
    seen = max(d["seq"] for d in listed["dead_letters"])
    later = await dead_letter(dry, "nowhere", b"later")
    async with dry.http.post(f"{dry.bridge_url}/dead-letters/purge?through={seen}") as response:
        assert response.status == 200 and (await response.json())["purged"] == 2
    _, listed = await dry.get_json("/dead-letters")
    assert [d["seq"] for d in listed["dead_letters"]] == [later]
    async with dry.http.post(f"{dry.bridge_url}/dead-letters/redrive") as response:
        answer = await response.json()
        assert response.status == 202 and [r["seq"] for r in answer["redriven"]] == [later] and not answer["errors"]
    async with dry.http.post(f"{dry.bridge_url}/dead-letters/purge?through=x") as response:
        assert response.status == 400


async def _count(stack: Stack, n: int) -> bool:
    _, listed = await stack.get_json("/dead-letters")
    return bool(listed["count"] == n)


async def test_stats_counts_the_stream_and_the_dead_letters(dry: Stack) -> None:
    code, stats = await dry.get_json("/stats")
    assert code == 200
    assert stats == {"in_flight": 0, "pending": 0, "redelivered": 0, "dead_letters": 0, "stream_messages": 0}
    await dead_letter(dry, "nowhere", b"x")
    response = await dry.publish("hello", b"hi")
    assert response.status == 202
    code, stats = await dry.get_json("/stats")
    assert stats["dead_letters"] == 1 and stats["stream_messages"] == 2 and stats["pending"] == 0


async def read_event(response: aiohttp.ClientResponse) -> tuple[str, Any]:
    """The next `event:`/`data:` block of a server-sent event stream (comments skipped)."""
    event, data = "message", []
    while True:
        line = (await response.content.readline()).decode().rstrip("\n")
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
        elif line == "" and data:
            return event, json.loads("\n".join(data))


async def test_the_run_streams_send_a_run_when_it_changes(dry: Stack) -> None:
    async with dry.http.get(f"{dry.bridge_url}/watch/runs?topic=hello") as stream:
        assert stream.status == 200 and stream.headers["Content-Type"].startswith("text/event-stream")
        assert await read_event(stream) == ("runs", {"runs": []})
        response = await dry.publish("hello", b"hi")
        request_id = (await response.json())["request_id"]
        while True:  # the run shows up (applied by dry-run; one event per change, at most one a second)
            event, data = await read_event(stream)
            assert event == "runs"
            if [r["run_id"] for r in data["runs"]] == [request_id]:
                break

    async with dry.http.get(f"{dry.bridge_url}/watch/runs/{request_id[:8]}") as stream:
        event, run = await read_event(stream)
        assert event == "run" and run["run_id"] == request_id and run["requests"][0]["request_id"] == request_id

    for path, status in (("/watch/runs/abcdefgh0", 404), ("/watch/runs/-", 400), ("/watch/runs?state=odd", 400)):
        async with dry.http.get(dry.bridge_url + path) as response:
            assert response.status == status, path


async def test_the_dashboard_files_carry_a_policy_that_forbids_inline_script(dry: Stack) -> None:
    for path in ("/", "/ui/", "/ui/app.js", "/ui/app.css"):
        async with dry.http.get(dry.bridge_url + path) as response:
            assert response.status == 200, path
            policy = response.headers["Content-Security-Policy"]
            assert "script-src 'self'" in policy and "'unsafe-inline'" not in policy and "unsafe-eval" not in policy
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            etag = response.headers["ETag"]
        async with dry.http.get(dry.bridge_url + path, headers={"If-None-Match": etag}) as response:
            assert response.status == 304
    async with dry.http.get(dry.bridge_url + "/") as response:
        html = await response.text()
    assert "<script src=\"/ui/app.js\"" in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "no inline script"
    assert not re.search(r"\son[a-z]+\s*=", html), "no inline event handler"
    for path in ("/ui/nothing.js", "/ui/..%2fapp.py", "/ui/app.py"):
        async with dry.http.get(dry.bridge_url + path) as response:
            assert response.status == 404, path


async def test_with_a_token_the_files_are_open_and_every_piece_of_data_is_closed(
        nats_server: EmbeddedNats, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json({"hello": ["hello.yaml"]}), "hello.yaml": job_manifest("hello")})
    settings = make_settings(nats_server, None, repo.path, tmp_path, bridge_token="tok")
    async with running_stack(settings) as stack:
        for path in ("/", "/ui/", "/ui/app.js"):
            async with stack.http.get(stack.bridge_url + path) as response:
                assert response.status == 200, path
        for method, path in (("GET", "/stats"), ("GET", "/dead-letters"), ("GET", "/dead-letters/1"),
                             ("GET", "/watch/runs"), ("GET", "/watch/runs/abcdefgh"), ("GET", "/topics"),
                             ("POST", "/dead-letters/purge"), ("POST", "/dead-letters/redrive"),
                             ("POST", "/dead-letters/1/redrive")):
            async with stack.http.request(method, stack.bridge_url + path) as response:
                assert response.status == 401, (method, path)
        async with stack.http.get(stack.bridge_url + "/stats", headers={"Authorization": "Bearer tok"}) as response:
            assert response.status == 200


def test_the_page_script_never_turns_data_into_html() -> None:
    """Values reach the page as text nodes only: none of the ways a string becomes markup or code."""
    script = (Path(__file__).resolve().parent.parent / "bridge" / "static" / "app.js").read_text()
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("//"))
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "DOMParser", "createContextualFragment", "srcdoc", "javascript:"):
        assert sink not in code, sink


async def test_open_event_streams_do_not_hold_up_a_shutdown(dry: Stack) -> None:
    """Ctrl-C on `gitfaas up` with a dashboard open: the streams end with the server, not after its grace."""
    bridge = Bridge(dry.settings.replace(bridge_port=free_port()))
    await bridge.start()
    runner = await serve(bridge, "127.0.0.1", bridge.settings.bridge_port)
    try:
        url = f"http://127.0.0.1:{bridge.settings.bridge_port}"
        async with aiohttp.ClientSession() as http, http.get(url + "/watch/runs") as stream:
            assert (await read_event(stream))[0] == "runs"
            loop = asyncio.get_running_loop()
            started = loop.time()
            await asyncio.wait_for(runner.cleanup(), timeout=10)
            runner = None
            assert loop.time() - started < 3
    finally:
        if runner is not None:
            await runner.cleanup()
        await bridge.stop()
