"""Issue 17: the bridge answers `POST /publish/<topic>` before aiohttp's router and middlewares (`bridge.app.
direct_publish`); every other request goes through the application. Both ways must give the same answers.

A request is sent three ways over a raw socket (so the request line is exactly what is written):
- direct: the plain path, `/publish/hello`;
- escaped: the same topic with a letter percent-escaped, `/publish/hell%6F`, which the direct route does
  not take (the router decodes it to the same topic);
- expect: the plain path with `Expect: 100-continue`, which the direct route leaves to the application too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from aiohttp import web

from bridge.app import Bridge, serve
from gitfaas import natsconn
from gitfaas.embedded import EmbeddedNats
from gitfaas.settings import Settings
from gitfaas.subjects import CONFIG_KEY, HEADER_REQUEST_ID, check_request_id, decode_params
from tests.conftest import make_settings, wait_for

TOKEN = "s3cret-token"
LIMIT = 1024  # MAX_PAYLOAD_BYTES of these bridges
STATE = {"commit": "c0ffee", "topics": [
    {"name": "hello", "configs": ["hello.yaml"], "params": {}, "variables": ["MESSAGE"]},
    {"name": "needs", "configs": ["needs.yaml"], "params": {"size": None}, "variables": ["size"]},
]}


@dataclass
class Answer:
    status: int
    headers: dict[str, str]  # names in lower case
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)

    @property
    def error(self) -> str:
        return self.json()["error"]


async def http(port: int, method: str, target: str, body: bytes = b"", headers: dict[str, str] | None = None,
               chunked: bool = False) -> Answer:
    """One request on its own connection, written byte for byte; the final answer (1xx skipped)."""
    head = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 300]), body[i:i + 300])
                           for i in range(0, len(body), 300)) + b"0\r\n\r\n"
    else:
        if body or method == "POST":
            head.append(f"Content-Length: {len(body)}")
        payload = body
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + payload)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    while True:
        header_block, _, rest = raw.partition(b"\r\n\r\n")
        lines = header_block.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:  # `100 Continue`, then the answer
            raw = rest
            continue
        fields = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if fields.get("transfer-encoding") == "chunked":
            rest = dechunk(rest)
        elif "content-length" in fields:
            rest = rest[:int(fields["content-length"])]
        return Answer(status, fields, rest)


def dechunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2:]


@dataclass
class Edge:
    settings: Settings
    bridge: Bridge
    port: int
    nc: nats.NATS  # the test's own connection
    through_app: list[str]  # the request targets the application (router and middlewares) handled

    async def send(self, way: str, topic: str, query: str = "", body: bytes = b"",
                   headers: dict[str, str] | None = None, chunked: bool = False) -> Answer:
        """POST to `topic` the way named: direct, escaped (last letter percent-escaped) or expect."""
        headers = dict(headers or {})
        if way == "escaped":
            topic = topic[:-1] + f"%{ord(topic[-1]):02X}"
        elif way == "expect":
            headers["Expect"] = "100-continue"
        else:
            assert way == "direct"
        target = f"/publish/{topic}{query}"
        before = len(self.through_app)
        answer = await http(self.port, "POST", target, body, headers, chunked)
        # The way taken is the way meant: only the plain path skips the application.
        assert self.through_app[before:] == ([] if way == "direct" else [target]), (way, target)
        return answer

    async def stored(self) -> int:
        return (await self.nc.jetstream().stream_info(self.settings.stream)).state.messages

    async def message(self, seq: int) -> Any:
        return await self.nc.jetstream().get_msg(self.settings.stream, seq)


WAYS = ("direct", "escaped", "expect")
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@contextlib.asynccontextmanager
async def running_edge(nats_server: EmbeddedNats, tmp_path: Path, **overrides: Any) -> AsyncIterator[Edge]:
    """A bridge served as `gitfaas bridge` serves it, with a configuration in the key-value bucket (no consumer)."""
    settings = make_settings(nats_server, None, tmp_path, tmp_path, max_payload_bytes=LIMIT, **overrides)
    nc = await natsconn.connect(settings, "test")
    bridge = Bridge(settings)
    runner = None
    try:
        config_kv, _ = await natsconn.ensure_buckets(nc.jetstream(), settings)
        await config_kv.put(CONFIG_KEY, json.dumps(STATE).encode())
        await bridge.start()
        through_app: list[str] = []
        outermost = bridge._errors_middleware  # every request the application handles passes it first

        @web.middleware
        async def seen(request: web.Request, handler: Any) -> web.StreamResponse:
            through_app.append(request.raw_path)
            return await outermost(request, handler)

        bridge._errors_middleware = seen  # type: ignore[method-assign]  # read by serve() -> bridge.app()
        runner = await serve(bridge, settings.bridge_host, settings.bridge_port)
        await wait_for(lambda: bridge.config_state is not None, message="the bridge to read the configuration")
        yield Edge(settings, bridge, settings.bridge_port, nc, through_app)
    finally:
        if runner is not None:
            await runner.cleanup()
        await bridge.stop()
        await nc.close()


@pytest.fixture
async def guarded(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Edge]:
    """BRIDGE_TOKEN set."""
    async with running_edge(nats_server, tmp_path, bridge_token=TOKEN) as edge:
        yield edge


@pytest.fixture
async def open_edge(nats_server: EmbeddedNats, tmp_path: Path) -> AsyncIterator[Edge]:
    """No BRIDGE_TOKEN."""
    async with running_edge(nats_server, tmp_path) as edge:
        yield edge


# (what is sent, the status and the start of the sentence every way must answer); topic, query, body, headers
REFUSALS: list[tuple[str, str, str, bytes, dict[str, str], int, str]] = [
    ("unknown topic", "nope", "", b"x", {}, 404, "topic 'nope' is not in the configuration in use (commit c0ffee)"),
    ("invalid topic", "a..b", "", b"x", {}, 400, "topic name is not valid"),
    ("bad wait", "hello", "?wait=sometime", b"x", {}, 400, "wait must be 'applied', 'completed' or 'run'"),
    ("bad timeout", "hello", "?wait=applied&timeout=soon", b"x", {}, 400, "timeout must be a number of seconds"),
    ("timeout out of range", "hello", "?timeout=0", b"x", {}, 400, "timeout must be between 0 and 300 seconds"),
    ("missing parameter", "needs", "", b"x", {}, 400, "topic 'needs' needs parameter the message does not give"),
    ("oversized body", "hello", "", b"x" * (LIMIT + 1), {}, 413, f"body is larger than MAX_PAYLOAD_BYTES ({LIMIT})"),
    ("invalid JSON", "hello", "", b'{"a": ', {"Content-Type": "application/json"}, 400, "body is not valid JSON: "),
    ("multipart", "hello", "", b"--x\r\n\r\nx\r\n--x--\r\n", {"Content-Type": "multipart/form-data; boundary=x"},
     415, "content type 'multipart/form-data' cannot be a message body"),
    ("bad idempotency key", "hello", "", b"x", {"Idempotency-Key": "has space"}, 400, "Idempotency-Key is not valid"),
]


async def answers_every_way(edge: Edge, topic: str, query: str, body: bytes, headers: dict[str, str],
                            chunked: bool = False) -> dict[str, Answer]:
    return {way: await edge.send(way, topic, query, body, headers, chunked) for way in WAYS}


def same_refusal(answers: dict[str, Answer], status: int, sentence: str) -> None:
    direct = answers["direct"]
    assert direct.status == status, (direct.status, direct.body)
    assert direct.error.startswith(sentence), direct.error
    for way, answer in answers.items():
        assert (answer.status, answer.error) == (direct.status, direct.error), way


async def test_refusals_are_the_same_every_way(open_edge: Edge) -> None:
    for name, topic, query, body, headers, status, sentence in REFUSALS:
        answers = await answers_every_way(open_edge, topic, query, body, headers)
        try:
            same_refusal(answers, status, sentence)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    chunked = await answers_every_way(open_edge, "hello", "", b"y" * (3 * LIMIT), {}, chunked=True)
    same_refusal(chunked, 413, f"body is larger than MAX_PAYLOAD_BYTES ({LIMIT})")  # no length: counted while read
    assert await open_edge.stored() == 0, "nothing refused was stored"


async def test_the_token_is_asked_for_every_way(guarded: Edge) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        answers = await answers_every_way(guarded, "hello", "", b"x", headers)
        same_refusal(answers, 401, "missing or wrong bearer token")
        for way, answer in answers.items():
            assert answer.headers.get("www-authenticate") == 'Bearer realm="gitfaas"', (way, headers)
    # The token is asked for before anything about the request is looked at (an unknown topic, a bad wait).
    same_refusal(await answers_every_way(guarded, "nope", "?wait=x", b"x", {}), 401, "missing or wrong bearer token")
    # With the token, the same refusals as without one.
    for name, topic, query, body, headers, status, sentence in REFUSALS:
        answers = await answers_every_way(guarded, topic, query, body, {**headers, **AUTH})
        try:
            same_refusal(answers, status, sentence)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc
    assert await guarded.stored() == 0


async def test_a_publish_is_accepted_and_stored_the_same_every_way(guarded: Edge) -> None:
    answers = await answers_every_way(guarded, "hello", "?name=value%20one&n=2", b"the body", {
        **AUTH, "Content-Type": "text/plain"})
    seqs = set()
    for way, answer in answers.items():
        assert answer.status == 202, (way, answer.body)
        reply = answer.json()
        assert set(reply) == {"request_id", "topic", "stream_seq", "duplicate"}, way
        assert reply["topic"] == "hello" and reply["duplicate"] is False, way
        assert check_request_id(reply["request_id"]) == reply["request_id"]
        stored = await guarded.message(reply["stream_seq"])
        assert stored.data == b"the body", way
        assert stored.subject == "gitfaas.topics.hello", way
        assert stored.headers[HEADER_REQUEST_ID] == reply["request_id"], way
        # The query string's parameters travel with the message, decoded; the reserved ones do not.
        assert decode_params(stored.headers) == {"name": "value one", "n": "2"}, way
        seqs.add(reply["stream_seq"])
    assert len(seqs) == 3 and await guarded.stored() == 3
    assert len({answer.json()["request_id"] for answer in answers.values()}) == 3


async def test_an_idempotency_key_is_shared_by_both_ways(open_edge: Edge) -> None:
    headers = {"Idempotency-Key": "order-17"}
    first = await open_edge.send("direct", "hello", "", b"once", headers)
    assert first.status == 202 and first.json()["duplicate"] is False, first.body
    for way in ("escaped", "expect", "direct"):
        again = await open_edge.send(way, "hello", "", b"twice", headers)
        assert again.status == 202, (way, again.body)
        assert again.json() == {**first.json(), "duplicate": True}, way
    assert await open_edge.stored() == 1


async def test_other_requests_on_publish_paths_go_through_the_application(open_edge: Edge) -> None:
    before = len(open_edge.through_app)
    got = await http(open_edge.port, "GET", "/publish/hello")
    assert got.status == 405 and got.error, got
    for target in ("/publish/", "/publish/a/b", "/publish/hello/", "/publish"):
        answer = await http(open_edge.port, "POST", target, b"x")
        assert answer.status == 404, (target, answer)
        assert answer.error, target  # a JSON sentence, not aiohttp's text page
    healthy = await http(open_edge.port, "GET", "/healthz")
    assert healthy.status == 200 and healthy.json() == {"status": "ok"}
    assert open_edge.through_app[before:] == ["/publish/hello", "/publish/", "/publish/a/b", "/publish/hello/",
                                              "/publish", "/healthz"]
    assert await open_edge.stored() == 0


async def test_a_publish_jetstream_refuses_is_not_accepted(open_edge: Edge) -> None:
    """The bridge never answers 202 for a message JetStream has not stored: here the stream refuses
    messages over 500 bytes, headers included (JetStream's error ack, err_code 10054): a 900-byte body is a 503."""
    js = open_edge.nc.jetstream()
    config = (await js.stream_info(open_edge.settings.stream)).config
    config.max_msg_size = 500
    await js.update_stream(config)
    for way in WAYS:
        answer = await open_edge.send(way, "hello", "", b"z" * 900)
        assert answer.status == 503, (way, answer.status, answer.body)
        assert answer.error.startswith("JetStream did not store the message"), way
    assert await open_edge.stored() == 0
    fits = await open_edge.send("direct", "hello", "", b"small")
    assert fits.status == 202 and fits.json()["stream_seq"] == 1, fits.body
