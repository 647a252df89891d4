"""Issue 13: no message can stop the service — poison messages, forged ids, brief outages.

Each test is an attack on the running bridge and consumer (real nats-server, the Kubernetes
emulator): it checks that the attack is refused with a reason (a dead letter over NATS, a JSON `400`
over HTTP) and that the next good message is still applied within seconds.
"""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest

from cli.operator import dead, replay
from consumer import tracking
from gitfaas import natsconn
from gitfaas.embedded import EmbeddedNats
from gitfaas.replay import DeadLetter, dead_letters, redrive
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle
from tests.test_core_loop import env_of
from tests.test_delivery import assert_exactly_once, publish_many

GOOD_WITHIN_SECONDS = 5.0

FIELDS = job_manifest("fields").replace(
    "            - name: NATS_URL\n",
    "            - name: FIELD\n              value: \"{{body.x}}\"\n            - name: NATS_URL\n")
WIDGET = "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: widget-{{RANDOM}}\nspec: {}\n"
NO_SUCH_KIND = job_manifest("nokind").replace("kind: Job", "kind: NoSuchKind")
MANY = {f"many{i}.yaml": f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: many{i}-{{{{RANDOM}}}}\ndata:\n  a: b\n"
        for i in range(20)}


@pytest.fixture
def poison_repo(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({
        "config.json": config_json({"hello": ["hello.yaml"], "fields": ["fields.yaml"], "widget": ["widget.yaml"],
                                    "nokind": ["nokind.yaml"], "many": sorted(MANY)}),
        "hello.yaml": job_manifest("hello"),
        "fields.yaml": FIELDS,
        "widget.yaml": WIDGET,
        "nokind.yaml": NO_SUCH_KIND,
        **MANY,
    }, "poison targets")
    return repo


@pytest.fixture
async def poison(nats_server: EmbeddedNats, k8s: EmulatorHandle, poison_repo: GitRepo, tmp_path: Path
                 ) -> AsyncIterator[Stack]:
    async with running_stack(make_settings(nats_server, k8s, poison_repo.path, tmp_path)) as stack:
        yield stack


# ---- helpers ----------------------------------------------------------------------------------

async def raw_publish(stack: Stack, topic: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    """What any NATS client may publish (a function, or an attacker with publish rights)."""
    nc = await nats.connect(stack.settings.nats_url)
    try:
        ack = await nc.jetstream().publish(f"gitfaas.topics.{topic}", body, headers=headers)
        return ack.seq
    finally:
        await nc.close()


async def all_dead_letters(stack: Stack) -> list[DeadLetter]:
    nc = await nats.connect(stack.settings.nats_url)
    try:
        return await dead_letters(nc.jetstream(), stack.settings)
    finally:
        await nc.close()


async def dead_letter_of(stack: Stack, seq: int, timeout: float = 10.0) -> DeadLetter:
    async def find() -> DeadLetter | None:
        return next((d for d in await all_dead_letters(stack) if d.headers.get("Gitfaas-Stream-Seq") == str(seq)),
                    None)
    return await wait_for(find, timeout=timeout, interval=0.1, message=f"the dead letter of stream message {seq}")


def jobs_of(k8s: EmulatorHandle, request_id: str) -> list[dict[str, Any]]:
    return [job for job in k8s.jobs() if env_of(job).get("REQUEST_UUID") == request_id]


async def status_of(stack: Stack, request_id: str) -> dict[str, Any] | None:
    code, document = await stack.get_json(f"/requests/{request_id}")
    return document if code == 200 else None


async def good_message_goes_through(stack: Stack, k8s: EmulatorHandle, topic: str = "hello") -> float:
    """Publish a good message over HTTP; it must become its Job within seconds. Returns how long it took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = await stack.publish(topic, "good")
    assert response.status == 202, await response.text()
    request_id = (await response.json())["request_id"]
    await wait_for(lambda: jobs_of(k8s, request_id), timeout=GOOD_WITHIN_SECONDS,
                   message="the next good message to be applied")
    return loop.time() - started


async def consumer_ready(stack: Stack) -> None:
    consumer = stack.consumers[0]

    def ready() -> bool:
        return consumer.ready()[0]
    await wait_for(ready, timeout=GOOD_WITHIN_SECONDS, message="the consumer to be ready")


async def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client library cleans them up); the answer's status, headers, body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        length = int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return status, headers, body
    finally:
        writer.close()


def assert_json_error(status: int, headers: dict[str, str], body: bytes, marker: bytes | None = None) -> str:
    assert 400 <= status < 600
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:200])
    answer = json.loads(body)
    assert set(answer) == {"error"} and isinstance(answer["error"], str) and answer["error"]
    if marker is not None:
        assert marker not in body, f"the answer echoes the input: {body[:300]!r}"
    return answer["error"]


# ==== 1. An over-long request id (a subject over nats-server's control-line limit) ===============

async def test_an_overlong_request_id_is_dead_lettered_and_processing_goes_on(
    poison: Stack, k8s: EmulatorHandle
) -> None:
    seq = await raw_publish(poison, "hello", b"x", {"Gitfaas-Request-Id": "a" * 5000})
    letter = await dead_letter_of(poison, seq)
    assert "Gitfaas-Request-Id" in letter.error and letter.attempts == "1", letter.error
    assert letter.request_id == f"seq-{seq}", "the dead letter carries an id gitfaas derived, not the bad one"
    assert not [job for job in k8s.jobs() if env_of(job)["MESSAGE"] == "eA=="], "nothing of it was applied"
    document = await wait_for(lambda: status_of(poison, f"seq-{seq}"), message="its status")
    assert document["state"] == "dead"
    await good_message_goes_through(poison, k8s)
    await consumer_ready(poison)


# ==== 2. A header named Status (what JetStream's control messages carry) =========================

@pytest.mark.parametrize("headers", [{"Status": "404"}, {"Status": "100", "Description": "Idle Heartbeat"},
                                     {"Status": "409", "Description": "Consumer Deleted"}, {"status": "x"}])
async def test_a_status_header_does_not_make_a_message_vanish(
    poison: Stack, k8s: EmulatorHandle, headers: dict[str, str]
) -> None:
    request_id = str(uuid.uuid4())
    await raw_publish(poison, "hello", b"", {**headers, "Gitfaas-Request-Id": request_id})
    await wait_for(lambda: jobs_of(k8s, request_id), timeout=GOOD_WITHIN_SECONDS, message="its Job")
    # Dead letters and replays read such messages back too.
    doomed = await raw_publish(poison, "fields", b"not json", {**headers, "Gitfaas-Request-Id": str(uuid.uuid4())})
    letter = await dead_letter_of(poison, doomed)
    assert "body.x" in letter.error
    out = io.StringIO()
    assert await dead(poison.settings, "list", None, False, False, out=out) == 0
    assert "body.x" in out.getvalue()
    out = io.StringIO()
    assert await replay(poison.settings, None, "hello", "1h", False, out=out) == 0
    assert "replayed" in out.getvalue()
    await wait_for(lambda: len(k8s.jobs()) >= 2, message="the replayed Job")
    await good_message_goes_through(poison, k8s)


# ==== 3. A brief API discovery failure is transient; only a definite "no such kind" is permanent ==

@pytest.mark.parametrize("status", [500, 503])
async def test_a_discovery_failure_is_retried_not_dead_lettered(
    poison: Stack, k8s: EmulatorHandle, status: int
) -> None:
    fault = k8s.emulator.fail_next(status, count=3, method="GET", path="/apis/batch/v1")
    response = await poison.publish("hello", "during discovery trouble")
    request_id = (await response.json())["request_id"]
    await wait_for(lambda: jobs_of(k8s, request_id), timeout=15, message="the Job once discovery answers")
    assert fault.hits == 3 and fault not in k8s.emulator.faults, "the discovery fault happened"
    await wait_for(lambda: _state_is(poison, request_id, "applied"), message="its status to say applied")
    assert (await status_of(poison, request_id))["attempts"] >= 2
    assert not await all_dead_letters(poison)


async def test_a_hung_discovery_request_times_out_and_is_retried(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, poison_repo: GitRepo, tmp_path: Path
) -> None:
    """Discovery requests have no timeout of their own: one the API server never answers must not hold
    every message behind the discovery lock."""
    settings = make_settings(nats_server, k8s, poison_repo.path, tmp_path, apply_timeout_seconds=1)
    async with running_stack(settings) as stack:
        fault = k8s.emulator.fail_next(504, count=1, method="GET", path="/apis/batch/v1", delay=30)
        response = await stack.publish("hello", "while discovery hangs")
        request_id = (await response.json())["request_id"]
        await wait_for(lambda: jobs_of(k8s, request_id), timeout=10, message="the Job after the hung request")
        assert fault.hits == 1
        await wait_for(lambda: _state_is(stack, request_id, "applied"), message="its status to say applied")
        await good_message_goes_through(stack, k8s)


@pytest.mark.parametrize(("topic", "reason"), [("widget", "example.com/v1"), ("nokind", "NoSuchKind")])
async def test_a_kind_the_api_server_does_not_have_goes_dead_at_once(
    poison: Stack, k8s: EmulatorHandle, topic: str, reason: str
) -> None:
    response = await poison.publish(topic, "x")
    request_id = (await response.json())["request_id"]
    [letter] = await wait_for(lambda: all_dead_letters(poison), message="the dead letter")
    assert letter.request_id == request_id and reason in letter.error and letter.attempts == "1", letter.error
    await good_message_goes_through(poison, k8s)


# ==== 4. Deeply nested JSON ======================================================================

DEEP = b"[" * 30000 + b"]" * 30000  # under MAX_PAYLOAD_BYTES


async def test_deep_json_is_refused_by_the_bridge_with_a_reason(poison: Stack, k8s: EmulatorHandle) -> None:
    port = poison.settings.bridge_port
    for path in ("/publish/hello", "/response/r.0.abcdefghijklmnop"):
        status, headers, body = await raw_http(port, (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(DEEP)}\r\n\r\n").encode() + DEEP)
        assert status == 400, (path, status, body[:200])
        assert "nested" in assert_json_error(status, headers, body)
    # The limit leaves ordinary JSON alone: 100 levels are accepted.
    fine = b'{"x": ' + b"[" * 99 + b"]" * 99 + b"}"
    response = await poison.publish("fields", fine, headers={"Content-Type": "application/json"})
    assert response.status == 202, await response.text()
    await good_message_goes_through(poison, k8s)


async def test_deep_json_is_dead_lettered_by_the_consumer_at_once(poison: Stack, k8s: EmulatorHandle) -> None:
    seq = await raw_publish(poison, "fields", DEEP, {"Gitfaas-Request-Id": str(uuid.uuid4())})
    letter = await dead_letter_of(poison, seq, timeout=GOOD_WITHIN_SECONDS)
    assert letter.attempts == "1" and "nested" in letter.error, letter.error
    # Sent as text over HTTP (the bridge checks only declared JSON): the consumer refuses it the same way.
    response = await poison.publish("fields", DEEP, headers={"Content-Type": "text/plain"})
    assert response.status == 202
    request_id = (await response.json())["request_id"]
    document = await wait_for(lambda: status_of(poison, request_id), message="its status")
    await wait_for(lambda: _state_is(poison, request_id, "dead"), message="it to go dead")
    assert document is not None
    await good_message_goes_through(poison, k8s)


async def _state_is(stack: Stack, request_id: str, state: str) -> bool:
    document = await status_of(stack, request_id)
    return bool(document and document.get("state") == state)


# ==== 5. Header values the NATS wire cannot carry (non-ASCII, over-long) =========================

@pytest.mark.parametrize("value", [b"\xe9t\xe9", "clé".encode(), b"k" * 5000, b"a b", b"a\x7fb"])
async def test_a_bad_idempotency_key_is_a_400_not_a_500(poison: Stack, k8s: EmulatorHandle, value: bytes) -> None:
    status, headers, body = await raw_http(poison.settings.bridge_port, (
        b"POST /publish/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nIdempotency-Key: " + value + b"\r\n\r\nx"))
    assert status == 400, (status, body[:300])
    error = assert_json_error(status, headers, body, value if len(value) > 3 else None)
    assert "Idempotency-Key" in error or b"\x7f" in value, error  # DEL is refused by the HTTP parser itself
    # A good key still deduplicates.
    first = await poison.publish("hello", "once", headers={"Idempotency-Key": "order-42"})
    again = await poison.publish("hello", "once", headers={"Idempotency-Key": "order-42"})
    assert (await again.json())["duplicate"] is True
    assert (await again.json())["request_id"] == (await first.json())["request_id"]
    await good_message_goes_through(poison, k8s)


# ==== 6. A forged request id cannot take over another request's status ===========================

async def test_a_reused_request_id_is_refused_and_the_owner_keeps_its_status(
    poison: Stack, k8s: EmulatorHandle
) -> None:
    response = await poison.publish("hello", "the victim")
    victim = (await response.json())["request_id"]
    await wait_for(lambda: _state_is(poison, victim, "applied"), message="the victim applied")
    before = await status_of(poison, victim)

    forged = await raw_publish(poison, "fields", b'{"x": "forged"}',
                               {"Gitfaas-Request-Id": victim, "Gitfaas-Parent": victim})
    letter = await dead_letter_of(poison, forged)
    assert victim in letter.error and f"stream message {before['stream_seq']}" in letter.error, letter.error
    assert letter.request_id == f"seq-{forged}" and letter.attempts == "1"
    assert [job["metadata"]["name"] for job in jobs_of(k8s, victim)] == [before["documents"][0]["name"]]
    after = await status_of(poison, victim)
    assert after == before, "the owner's status, responses and lineage are untouched"
    assert (await status_of(poison, f"seq-{forged}"))["state"] == "dead"
    await good_message_goes_through(poison, k8s)


# ==== 7. Errors of the HTTP parser are JSON and do not echo the input ============================

MARK = b"ECHO1234"


@pytest.mark.parametrize("request_bytes", [
    b"GET /" + b"x" * 9000 + MARK + b" HTTP/1.1\r\nHost: x\r\n\r\n",  # request line too long
    b"GET /topics HTTP/1.1\r\nHost: x\r\nX-Long: " + MARK + b"y" * 9000 + b"\r\n\r\n",  # header too long
    b"GET /topics HTTP/1.1\r\nHost: x\r\nX-Bad: a\x01" + MARK + b"\r\n\r\n",  # control byte in a value
    b"GET /topics HTTP/1.1\r\nHost: x\r\nBad Name" + MARK + b": v\r\n\r\n",  # space in a header name
    b"G<T /topics HTTP/1.1\r\nHost: x\r\n\r\n",  # bad method
    b"GET /topics HTTP/9" + MARK + b"\r\nHost: x\r\n\r\n",  # bad version
    b"POST /publish/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1" + MARK + b"\r\n\r\nx",  # bad length
    b"POST /publish/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
    b"POST /publish/hello HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZ" + MARK + b"\r\nx\r\n0\r\n\r\n",
    b"GET /topics HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(200)) + b"\r\n",  # too many
])
async def test_http_parser_errors_are_json_without_the_input(
    poison: Stack, k8s: EmulatorHandle, request_bytes: bytes
) -> None:
    status, headers, body = await raw_http(poison.settings.bridge_port, request_bytes)
    assert status in (400, 413, 431), (status, body[:200])
    assert_json_error(status, headers, body, MARK)
    await good_message_goes_through(poison, k8s)


# ==== Every header value gitfaas reads is checked where it enters ================================

@pytest.mark.parametrize(("headers", "named"), [
    ({"Gitfaas-Request-Id": "r" * 129}, "Gitfaas-Request-Id"),
    ({"Gitfaas-Request-Id": "a.b"}, "Gitfaas-Request-Id"),  # would add a token to the status key's subject
    ({"Gitfaas-Request-Id": "a*"}, "Gitfaas-Request-Id"),  # a wildcard
    ({"Gitfaas-Request-Id": "-a"}, "Gitfaas-Request-Id"),
    ({"Gitfaas-Request-Id": "é"}, "Gitfaas-Request-Id"),
    ({"Gitfaas-Request-Id": "seq-1"}, "Gitfaas-Request-Id"),  # reserved: would pre-empt message 1's id
    ({"Gitfaas-Parent": "p" * 5000}, "Gitfaas-Parent"),  # the parent's status key
    ({"Gitfaas-Parent": "a/b"}, "Gitfaas-Parent"),
    ({"Gitfaas-Retry": "9" * 5000}, "Gitfaas-Retry"),  # int() refuses over 4300 digits
    ({"Gitfaas-Retry": "²"}, "Gitfaas-Retry"),  # str.isdigit() says yes, int() says no
    ({"Gitfaas-Retry": "-1"}, "Gitfaas-Retry"),
])
async def test_a_header_that_is_not_valid_is_refused_naming_it(
    poison: Stack, k8s: EmulatorHandle, headers: dict[str, str], named: str
) -> None:
    seq = await raw_publish(poison, "hello", b"x", headers)
    letter = await dead_letter_of(poison, seq)
    assert named in letter.error and letter.attempts == "1", letter.error
    assert letter.request_id == f"seq-{seq}"
    assert not any(value in letter.error for value in headers.values()), "the refused value is not quoted"
    assert not [job for job in k8s.jobs() if env_of(job)["MESSAGE"] == "eA=="], "nothing of it was applied"
    await wait_for(lambda: _state_is(poison, f"seq-{seq}", "dead"), message="its status to say dead")
    await good_message_goes_through(poison, k8s)


async def test_headers_gitfaas_only_reports_on_never_stop_a_message(poison: Stack, k8s: EmulatorHandle) -> None:
    """A `Gitfaas-Published-At` that is not a time only feeds a metric: ignored, the message is applied."""
    ids = []
    for stamp in ("nan", "inf", "-1", "1e999", "x" * 5000, ""):
        request_id = str(uuid.uuid4())
        ids.append(request_id)
        await raw_publish(poison, "hello", b"x", {"Gitfaas-Request-Id": request_id, "Gitfaas-Published-At": stamp})
    await wait_for(lambda: all(jobs_of(k8s, i) for i in ids), timeout=GOOD_WITHIN_SECONDS, message="their Jobs")
    assert not await all_dead_letters(poison)


async def test_jetstream_headers_of_a_message_cannot_stop_its_dead_letter(poison: Stack, k8s: EmulatorHandle) -> None:
    """The dead letter keeps the original's headers, but not `Nats-*` ones: stored again, those would steer
    JetStream (an expected last sequence true of GITFAAS is false of GITFAAS_DEAD: the letter is refused)."""
    await good_message_goes_through(poison, k8s)  # GITFAAS holds one message, GITFAAS_DEAD none
    seq = await raw_publish(poison, "fields", b"not json", {
        "Gitfaas-Request-Id": str(uuid.uuid4()), "Nats-Expected-Last-Sequence": "1",
        "Nats-Expected-Last-Subject-Sequence": "0", "X-Kept": "yes"})
    letter = await dead_letter_of(poison, seq)
    assert "body.x" in letter.error and letter.headers["X-Kept"] == "yes"
    assert not [k for k in letter.headers if k.startswith("Nats-Expected-Last")]
    await good_message_goes_through(poison, k8s)


async def test_a_message_too_large_to_copy_is_still_dead_lettered_and_redriven(
    poison: Stack, k8s: EmulatorHandle
) -> None:
    """At NATS's size limit the original and the dead letter's own headers do not fit in one message: the
    letter keeps the reason and leaves the body in the stream, where a redrive reads it back."""
    nc = await nats.connect(poison.settings.nats_url)
    try:
        js = nc.jetstream()
        padding = "p" * 2000  # kept by the dead letter, dropped by a redrive (it is not a parameter)
        request_id = str(uuid.uuid4())
        header_block = f"NATS/1.0\r\nGitfaas-Request-Id: {request_id}\r\nX-Padding: {padding}\r\n\r\n"
        body = b"z" * (nc.max_payload - len(header_block))
        ack = await js.publish("gitfaas.topics.fields", body,
                               headers={"Gitfaas-Request-Id": request_id, "X-Padding": padding})
        letter = await dead_letter_of(poison, ack.seq)
        assert "body.x" in letter.error and letter.headers.get("Gitfaas-Body-Omitted") == str(len(body))
        assert letter.request_id == request_id and letter.data == b""
        await wait_for(lambda: _state_is(poison, request_id, "dead"), message="its status to say dead")
        again = await redrive(js, poison.settings, letter.seq)
        assert again.parent == request_id
        assert (await js.get_msg("GITFAAS", again.stream_seq)).data == body
    finally:
        await nc.close()
    await good_message_goes_through(poison, k8s)


# ==== The bridge's routes refuse ids and values that cannot be, in JSON, without quoting them ====

LONG = "r" * 3000 + MARK.decode()


@pytest.mark.parametrize(("request_line", "extra", "status"), [
    (f"GET /requests/{LONG}", "", 400),
    ("GET /requests/a.b" + MARK.decode(), "", 400),
    ("GET /requests/%00" + MARK.decode(), "", 400),
    (f"GET /response/{LONG}", "", 400),
    (f"POST /requests/{LONG}/replay", "", 400),
    (f"POST /response/{LONG}", "", 404),
    ("POST /response/r.0.x" + MARK.decode(), "", 404),
    (f"POST /publish/hello?parent={LONG}", "", 400),
    ("POST /publish/hello?parent=a%0D%0ANats-Msg-Id:" + MARK.decode(), "", 400),
    (f"POST /publish/hello?wait={MARK.decode()}", "", 400),
    (f"POST /publish/hello?timeout={MARK.decode()}", "", 400),
    (f"POST /publish/hello?{MARK.decode()}%20x=1", "", 400),  # a parameter name that cannot be
    (f"POST /publish/{'t' * 300}{MARK.decode()}", "", 400),
    (f"POST /publish/bad*{MARK.decode()}", "", 400),
    ("POST /publish/hello", f"Gitfaas-Parent: {LONG}\r\n", 400),
    ("POST /publish/hello", "Gitfaas-Parent: caf\xe9" + MARK.decode() + "\r\n", 400),
    ("POST /publish/hello", "Content-Type: text/caf\xe9" + MARK.decode() + "\r\n", 400),
    ("POST /publish/hello", f"Content-Type: text/{'c' * 300}{MARK.decode()}\r\n", 400),
])
async def test_bridge_routes_refuse_what_cannot_be_an_id_or_header(
    poison: Stack, k8s: EmulatorHandle, request_line: str, extra: str, status: int
) -> None:
    raw = f"{request_line} HTTP/1.1\r\nHost: x\r\n{extra}Content-Length: 1\r\n\r\nx".encode("latin-1")
    code, headers, body = await raw_http(poison.settings.bridge_port, raw)
    assert code == status, (code, body[:300])
    assert_json_error(code, headers, body, MARK)
    await good_message_goes_through(poison, k8s)


DEEP_UTF16 = ('{"x": "\u2200", "y": ' + "[" * 3000 + "]" * 3000 + "}").encode("utf-16")


async def test_deep_json_in_utf16_is_refused_on_both_sides(poison: Stack, k8s: EmulatorHandle) -> None:
    """json.loads reads UTF-16 too, where a '"' byte can be half of another character ('∀' is 0x2200)."""
    response = await poison.publish("fields", DEEP_UTF16, headers={"Content-Type": "application/json"})
    assert response.status == 400 and "nested" in (await response.json())["error"]
    seq = await raw_publish(poison, "fields", DEEP_UTF16, {"Gitfaas-Request-Id": str(uuid.uuid4())})
    letter = await dead_letter_of(poison, seq, timeout=GOOD_WITHIN_SECONDS)
    assert letter.attempts == "1" and "nested" in letter.error, letter.error
    await good_message_goes_through(poison, k8s)


# ==== A connection NATS closes is made again; readiness and liveness say how it is ===============

async def _get(url: str) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.json()


async def test_a_closed_nats_connection_is_made_again_and_health_says_so_meanwhile(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, poison_repo: GitRepo, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(nats_server, k8s, poison_repo.path, tmp_path, nats_unhealthy_seconds=1)
    async with running_stack(settings) as stack:
        consumer, bridge_ = stack.consumers[0], stack.bridge
        health = f"http://127.0.0.1:{consumer.http_port}"
        opened = asyncio.Event()  # new connections wait for it: the outage lasts until the test says
        real_connect = natsconn.connect

        async def held_connect(*args: Any, **kwargs: Any) -> Any:
            await opened.wait()
            return await real_connect(*args, **kwargs)

        monkeypatch.setattr(natsconn, "connect", held_connect)
        # What nats-py does after a protocol error (e.g. "maximum control line exceeded"): it closes the
        # connection for good instead of reconnecting.
        await consumer.nc.close()
        await bridge_.nc.close()
        assert (await _get(f"{health}/readyz"))[1]["nats"] == "closed"
        assert (await _get(f"{stack.bridge_url}/readyz"))[0] == 503
        response = await stack.publish("hello", "while closed")
        assert response.status == 503 and "error" in await response.json()
        code, answer = await wait_for(lambda: _unhealthy(f"{health}/healthz"), timeout=10,
                                      message="consumer /healthz to fail")
        assert code == 503 and "NATS" in answer["error"]

        opened.set()
        await wait_for(lambda: consumer.ready()[0] and bridge_.nc.is_connected, timeout=10,
                       message="both connections made again")
        assert consumer.reconnects == 1 and bridge_.reconnects == 1
        assert (await _get(f"{health}/healthz"))[0] == 200
        assert (await _get(f"{stack.bridge_url}/readyz"))[0] == 200
        await good_message_goes_through(stack, k8s)


async def _unhealthy(url: str) -> tuple[int, dict[str, Any]] | None:
    code, answer = await _get(url)
    return (code, answer) if code != 200 else None


async def test_liveness_fails_while_nats_is_unreachable_and_recovers_with_it(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, poison_repo: GitRepo, tmp_path: Path
) -> None:
    settings = make_settings(nats_server, k8s, poison_repo.path, tmp_path, nats_unhealthy_seconds=1)
    async with running_stack(settings) as stack:
        health = f"http://127.0.0.1:{stack.consumers[0].http_port}"
        assert (await _get(f"{health}/healthz"))[0] == 200
        await nats_server.stop()
        code, answer = await wait_for(lambda: _unhealthy(f"{health}/healthz"), timeout=15,
                                      message="consumer /healthz to fail")
        assert code == 503 and answer["nats_down_seconds"] >= 1
        code, ready = await _get(f"{health}/readyz")
        assert code == 503 and ready["nats"] != "connected"
        await nats_server.start()
        await wait_for(lambda: stack.consumers[0].ready()[0] and stack.bridge.nc.is_connected, timeout=20,
                       message="reconnected")
        assert (await _get(f"{health}/healthz"))[0] == 200
        await good_message_goes_through(stack, k8s)


# ==== An API server failing half of all requests for 10 s during a burst ========================

async def test_half_of_all_api_requests_failing_for_ten_seconds_loses_and_doubles_nothing(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, poison_repo: GitRepo, tmp_path: Path
) -> None:
    settings = make_settings(nats_server, k8s, poison_repo.path, tmp_path)
    async with running_stack(settings) as stack:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Every other request fails, whatever it is: discovery, lists, watches, applies.
        fault = k8s.emulator.fail_next(500, count=None, method=None, path=".*", every=2, duration=10)
        ids = await publish_many(stack.settings.nats_url, "hello", 200)
        published = loop.time() - started
        await wait_for(lambda: len(k8s.jobs()) >= len(ids), timeout=120, interval=0.2,
                       message="a Job for every message")
        finished = loop.time() - started
        assert published < 10, "the burst happened during the fault"
        assert fault.hits >= 50 and abs(fault.hits - fault.passed) <= 1, (fault.hits, fault.passed)
        assert any(f.startswith("GET /apis") for f in fault.failed), "discovery failed too"
        assert any(f.startswith("PATCH") for f in fault.failed)
        assert_exactly_once(k8s, ids)
        assert not await all_dead_letters(stack)
        states = [await status_of(stack, i) for i in ids]
        assert all(s is not None and s["state"] == "applied" for s in states)
        retried = sum(1 for s in states if s["attempts"] > 1)
        assert retried >= 50, f"only {retried} messages met the fault"
        print(f"\n200 messages, {fault.hits} API requests failed, {retried} messages retried, "
              f"all applied once after {finished:.1f}s")


# ==== What other NATS clients can send, that nats-py would not ===================================

async def hpub(stack: Stack, subject: str, header_block: bytes, body: bytes) -> int:
    """Publish through the bare protocol: headers exactly as given (any client library may differ).
    Returns the message's stream sequence."""
    host, port = stack.settings.nats_url.removeprefix("nats://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"protocol":1}\r\n')
        writer.write(b"HPUB %s %d %d\r\n%s%s\r\nPING\r\n" % (
            subject.encode(), len(header_block), len(header_block) + len(body), header_block, body))
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"PONG")
    finally:
        writer.close()
    nc = await nats.connect(stack.settings.nats_url)
    try:
        return (await nc.jetstream().stream_info("GITFAAS")).state.last_seq
    finally:
        await nc.close()


async def test_header_names_and_bytes_nats_py_would_not_send_cannot_stop_a_dead_letter(
    poison: Stack, k8s: EmulatorHandle
) -> None:
    request_id = str(uuid.uuid4())
    block = (f"NATS/1.0\r\nGitfaas-Request-Id: {request_id}\r\nX(odd)@name: v\r\nX-Bytes: \xff\xfe\r\n\r\n"
             ).encode("latin-1")
    seq = await hpub(poison, "gitfaas.topics.fields", block, b"not json")
    letter = await dead_letter_of(poison, seq)
    assert letter.request_id == request_id and "body.x" in letter.error
    assert "X(odd)@name" not in letter.headers and letter.headers["X-Bytes"] == "\ufffd\ufffd"
    await good_message_goes_through(poison, k8s)


async def test_the_bridge_refuses_what_nats_would_close_the_connection_for(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, poison_repo: GitRepo, tmp_path: Path
) -> None:
    """With MAX_PAYLOAD_BYTES raised to NATS's own limit, body and headers together can exceed it."""
    settings = make_settings(nats_server, k8s, poison_repo.path, tmp_path, max_payload_bytes=1024 * 1024)
    async with running_stack(settings) as stack:
        limit = stack.bridge.nc.max_payload
        response = await stack.publish("hello", b"x" * (limit - 10))
        assert response.status == 413 and "NATS" in (await response.json())["error"]
        assert stack.bridge.nc.is_connected and stack.bridge.reconnects == 0
        await good_message_goes_through(stack, k8s)


# ==== Nothing a message or a function sends can grow one status document without end ============

async def test_responses_that_would_outgrow_the_status_document_are_refused(poison: Stack, k8s: EmulatorHandle) -> None:
    """A status document is one NATS message: a write that would not fit is refused (413), instead of
    being sent and having the server close the bridge's connection."""
    response = await poison.publish("many", "x")
    request_id = (await response.json())["request_id"]
    await wait_for(lambda: _state_is(poison, request_id, "applied"), message="the request applied")
    uids = [d["function_uid"] for d in (await status_of(poison, request_id))["documents"]]
    codes = []
    for uid in uids:
        async with poison.http.post(f"{poison.bridge_url}/response/{uid}", data="r" * 65000,
                                    headers={"Content-Type": "text/plain"}) as answer:
            codes.append(answer.status)
            if answer.status != 200:
                assert "NATS" in (await answer.json())["error"]
    assert codes[:10] == [200] * 10 and 413 in codes, codes
    assert poison.bridge.nc.is_connected and poison.bridge.reconnects == 0
    code, stored = await poison.get_json(f"/response/{request_id}")
    assert code == 200 and stored["responses"][0] == "r" * 65000
    await good_message_goes_through(poison, k8s)


async def test_a_request_lists_a_bounded_number_of_children(
    poison: Stack, k8s: EmulatorHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Anyone may name a request as parent; past MAX_CHILDREN the children are only counted."""
    monkeypatch.setattr(tracking, "MAX_CHILDREN", 3)
    response = await poison.publish("hello", "parent")
    parent = (await response.json())["request_id"]
    await wait_for(lambda: _state_is(poison, parent, "applied"), message="the parent applied")
    children = [str(uuid.uuid4()) for _ in range(5)]
    for child in children:
        await raw_publish(poison, "hello", b"child", {"Gitfaas-Request-Id": child, "Gitfaas-Parent": parent})
    await wait_for(lambda: all(jobs_of(k8s, c) for c in children), message="the children's Jobs")

    async def counted() -> dict[str, Any] | None:
        document = await status_of(poison, parent)
        return document if document and document.get("children_omitted") == 2 else None
    document = await wait_for(counted, message="the parent to count the children it does not list")
    assert len(document["children"]) == 3 and set(document["children"]) <= set(children)


async def test_a_message_with_header_names_nats_py_would_not_send_can_be_replayed(
    poison: Stack, k8s: EmulatorHandle
) -> None:
    request_id = str(uuid.uuid4())
    block = f"NATS/1.0\r\nGitfaas-Request-Id: {request_id}\r\nGitfaas-Param-a(b): 1\r\n\r\n".encode()
    await hpub(poison, "gitfaas.topics.hello", block, b"x")
    await wait_for(lambda: _state_is(poison, request_id, "applied"), message="it applied")
    async with poison.http.post(f"{poison.bridge_url}/requests/{request_id}/replay") as answer:
        assert answer.status == 202, await answer.text()
        again = (await answer.json())["request_id"]
    await wait_for(lambda: jobs_of(k8s, again), timeout=GOOD_WITHIN_SECONDS, message="the replay's Job")


async def test_replaying_a_message_at_the_size_limit_is_refused_not_fatal(poison: Stack, k8s: EmulatorHandle) -> None:
    """A replay adds headers (its parent): at NATS's limit that would make the server close the connection."""
    nc = await nats.connect(poison.settings.nats_url)
    try:
        request_id = str(uuid.uuid4())
        block = f"NATS/1.0\r\nGitfaas-Request-Id: {request_id}\r\n\r\n"
        await nc.jetstream().publish("gitfaas.topics.many", b"z" * (nc.max_payload - len(block)),  # no MESSAGE
                                     headers={"Gitfaas-Request-Id": request_id})
    finally:
        await nc.close()
    await wait_for(lambda: _state_is(poison, request_id, "applied"), message="it applied")
    async with poison.http.post(f"{poison.bridge_url}/requests/{request_id}/replay") as answer:
        assert answer.status == 413 and "NATS" in (await answer.json())["error"]
    assert poison.bridge.nc.is_connected and poison.bridge.reconnects == 0
    await good_message_goes_through(poison, k8s)
