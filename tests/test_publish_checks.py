"""Issue 11, the publish side: what a publish is refused for before anything is stored (over HTTP and
with `gitfaas publish`, with the same sentences), parameter defaults, content types, and what a wait
answers when the request did not succeed."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cli.operator import publish
from gitfaas import natsconn
from gitfaas.embedded import EmbeddedNats, free_port
from gitfaas.publishing import wait_status
from gitfaas.subjects import CONFIG_KEY
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle
from tests.test_core_loop import env_of

ROOT = Path(__file__).resolve().parent.parent

SCALE_JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: scale-{{RANDOM}}
spec:
  parallelism: {{replicas}}
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: busybox:1.36
          env:
            - name: OWNER
              value: "{{owner}}"
            - name: SIZE
              value: "{{size}}"
            - name: FILE
              value: "{{body.file}}"
"""
# `replicas` has a default, `size` is declared without one (null), `owner` only appears in the manifest.
SCALE_PARAMS = {"replicas": "1", "size": None}
MISSING_BOTH = ("topic 'scale' needs parameters the message does not give: owner, size (give each as a "
                "parameter of the message, or a default in the topic's \"params\" in config.json)")


def scale_files() -> dict[str, str]:
    return {"config.json": config_json({"scale": ["scale.yaml"], "hello": ["hello.yaml"]},
                                       scale={"params": SCALE_PARAMS}),
            "scale.yaml": SCALE_JOB, "hello.yaml": job_manifest("hello")}


@pytest.fixture
async def scale(nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path) -> AsyncIterator[Stack]:
    repo = GitRepo(tmp_path / "repo")
    repo.commit(scale_files())
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        yield stack


def gitfaas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


async def stored(stack: Stack) -> int:
    assert stack.bridge.js is not None
    return (await stack.bridge.js.stream_info(stack.settings.stream)).state.messages


async def error_of(response: Any) -> str:
    return (await response.json())["error"]


FILE_BODY = json.dumps({"file": "f.csv"})


# ---- missing parameters and defaults, over HTTP ------------------------------------------------

async def test_a_missing_parameter_is_refused_naming_every_one_and_nothing_is_stored(
    scale: Stack, k8s: EmulatorHandle
) -> None:
    response = await scale.publish("scale", FILE_BODY)
    assert response.status == 400
    assert await error_of(response) == MISSING_BOTH
    response = await scale.publish("scale", FILE_BODY, params={"owner": "me", "wait": "applied"})
    assert response.status == 400
    assert (await error_of(response)).startswith("topic 'scale' needs parameter the message does not give: size (")
    assert await stored(scale) == 0, "a refused publish stores nothing"

    # The default fills `replicas`; a message's own value wins over it.
    response = await scale.publish("scale", FILE_BODY, params={"owner": "me", "size": "big"})
    assert response.status == 202, await response.text()
    response = await scale.publish("scale", FILE_BODY, params={"owner": "you", "size": "", "replicas": "3"})
    assert response.status == 202, await response.text()
    jobs = await wait_for(lambda: len(k8s.jobs()) == 2 and k8s.jobs(), message="both Jobs")
    by_owner = {env_of(job)["OWNER"]: job for job in jobs}
    assert by_owner["me"]["spec"]["parallelism"] == 1 and env_of(by_owner["me"])["SIZE"] == "big"
    assert by_owner["you"]["spec"]["parallelism"] == 3 and env_of(by_owner["you"])["SIZE"] == ""


async def test_topics_shows_each_topics_parameter_defaults(scale: Stack) -> None:
    status, state = await scale.get_json("/topics")
    assert status == 200
    topics = {topic["name"]: topic for topic in state["topics"]}
    assert topics["scale"]["params"] == SCALE_PARAMS
    assert {"owner", "size", "replicas", "body.file"} <= set(topics["scale"]["variables"])
    assert topics["hello"]["params"] == {}


# ---- content types ----------------------------------------------------------------------------

ACCEPTED = ["plain/text", "text/plain", "text/csv; charset=utf-8", "application/xml", "image/png",
            "application/octet-stream", "application/x-www-form-urlencoded", "application/vnd.api+json", None]


async def test_every_content_type_that_can_be_one_body_is_taken_as_bytes(stack: Stack, k8s: EmulatorHandle) -> None:
    bodies = {}
    for index, content_type in enumerate(ACCEPTED):
        body = json.dumps({"n": index}).encode() if content_type and "json" in content_type else b"body %d\xff" % index
        headers = {"Content-Type": content_type} if content_type else {}
        async with stack.http.post(f"{stack.bridge_url}/publish/hello", data=body, headers=headers,
                                   skip_auto_headers=["Content-Type"]) as response:
            assert response.status == 202, (content_type, await response.text())
        bodies[content_type] = body
    jobs = await wait_for(lambda: len(k8s.jobs()) == len(ACCEPTED) and k8s.jobs(), message="one Job per body")
    assert sorted(base64.b64decode(env_of(job)["MESSAGE"]) for job in jobs) == sorted(bodies.values())

    response = await stack.publish("hello", b"--x--", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status == 415
    error = await error_of(response)
    assert error.startswith("content type 'multipart/form-data' cannot be a message body (it holds several parts)")
    for accepted in ("any text/* type", "plain/text", "application/json", "application/octet-stream",
                     "application/x-www-form-urlencoded", "or none"):
        assert accepted in error


# ---- ?wait= ------------------------------------------------------------------------------------

async def test_wait_answers_422_with_the_document_when_the_request_failed_or_went_dead(
    scale: Stack, k8s: EmulatorHandle
) -> None:
    waiter = asyncio.create_task(scale.http.post(f"{scale.bridge_url}/publish/hello?wait=completed&timeout=20",
                                                 data=b"will fail"))
    [job] = await wait_for(lambda: k8s.jobs(), message="the Job")
    await k8s.set_job_status(job["metadata"]["name"], condition="Failed", reason="BackoffLimitExceeded",
                             message="Job has reached the specified backoff limit")
    response = await waiter
    assert response.status == 422
    document = await response.json()
    assert document["state"] == "failed" and "BackoffLimitExceeded" in document["documents"][0]["reason"]

    # Every parameter given, but the body is not JSON: `body.file` has no value and the consumer gives up.
    response = await scale.publish("scale", "not json", params={"owner": "me", "size": "1", "wait": "applied",
                                                                  "timeout": "20"})
    assert response.status == 422
    document = await response.json()
    assert document["state"] == "dead" and "missing variables: body.file" in document["error"]


def test_wait_codes_reached_ended_badly_and_timed_out() -> None:
    assert wait_status(True, {"state": "succeeded"}) == 200
    assert wait_status(True, {"state": "applied"}) == 200
    for state in ("failed", "dead", "cancelled"):
        assert wait_status(True, {"state": state}) == 422
    assert wait_status(False, {"state": "applied"}) == 504
    assert wait_status(False, None) == 504


# ---- gitfaas publish ---------------------------------------------------------------------------

async def test_cli_publish_refuses_like_the_bridge_with_the_same_sentences(
    scale: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    limit = scale.settings.max_payload_bytes
    cases = [("nope", b"x", [], 404), ("scale", FILE_BODY.encode(), [], 400),
             ("scale", FILE_BODY.encode(), [("owner", "me")], 400), ("hello", b"x" * (limit + 1), [], 413)]
    for topic, body, params, code in cases:
        response = await scale.publish(topic, body, params=dict(params))
        assert response.status == code
        sentence = await error_of(response)
        capsys.readouterr()
        out = io.StringIO()
        assert await publish(scale.settings, topic, body, params, None, 5.0, out=out) == 1
        assert capsys.readouterr().err == f"gitfaas publish: {sentence}\n" and out.getvalue() == ""
    assert await stored(scale) == 0, "nothing refused was stored, by either way"

    out = io.StringIO()
    assert await publish(scale.settings, "scale", FILE_BODY.encode(), [("owner", "me"), ("size", "s")],
                         None, 5.0, out=out) == 0
    answer = json.loads(out.getvalue())
    assert answer["topic"] == "scale" and answer["stream_seq"] == 1 and answer["duplicate"] is False


async def test_cli_publish_wait_exits_non_zero_unless_the_state_is_reached(
    scale: Stack, k8s: EmulatorHandle, capsys: pytest.CaptureFixture[str]
) -> None:
    out = io.StringIO()
    assert await publish(scale.settings, "hello", b"one", [], "applied", 20.0, out=out) == 0
    assert "applied" in out.getvalue()

    assert await publish(scale.settings, "hello", b"two", [], "completed", 0.5, out=io.StringIO()) == 3
    assert capsys.readouterr().err == "gitfaas publish: not completed within 0.5s (state applied)\n"

    out = io.StringIO()
    waiter = asyncio.create_task(publish(scale.settings, "hello", b"three", [], "completed", 20.0, out=out))
    job = await wait_for(lambda: [j for j in k8s.jobs() if env_of(j)["MESSAGE"] == "dGhyZWU="], message="Job")
    await k8s.set_job_status(job[0]["metadata"]["name"], condition="Failed", reason="BackoffLimitExceeded",
                             message="Job has reached the specified backoff limit")
    assert await waiter == 1
    captured = capsys.readouterr()
    assert "failed" in out.getvalue()
    assert captured.err.startswith("gitfaas publish: request ") and " ended failed: " in captured.err

    out = io.StringIO()
    waiter = asyncio.create_task(publish(scale.settings, "hello", b"four", [], "completed", 20.0, out=out))
    job = await wait_for(lambda: [j for j in k8s.jobs() if env_of(j)["MESSAGE"] == "Zm91cg=="], message="Job")
    await k8s.set_job_status(job[0]["metadata"]["name"], condition="Complete")
    assert await waiter == 0
    assert "succeeded" in out.getvalue()


async def test_cli_publish_nats_problems_are_one_line(
    nats_server: EmbeddedNats, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    unreachable = await asyncio.to_thread(gitfaas, "publish", "hello", "x",
                                          env={"NATS_URL": f"nats://127.0.0.1:{free_port()}"})
    assert unreachable.returncode == 1
    [line] = unreachable.stderr.splitlines()
    assert line.startswith("gitfaas: cannot reach NATS at nats://127.0.0.1:")

    # NATS, but no consumer ever loaded a configuration there: the bridge's 503 sentence.
    settings = make_settings(nats_server, None, tmp_path, tmp_path)
    nothing = await asyncio.to_thread(gitfaas, "publish", "hello", "x", env={"NATS_URL": nats_server.url})
    assert nothing.returncode == 1
    assert nothing.stderr == "gitfaas publish: no configuration loaded yet (is a consumer running?)\n"

    # A configuration, but no stream: one line, nothing published.
    nc = await natsconn.connect(settings, "test")
    try:
        config_kv, _ = await natsconn.ensure_buckets(nc.jetstream(), settings)
        await config_kv.put(CONFIG_KEY, json.dumps({"commit": "c0ffee", "topics": [
            {"name": "hello", "configs": ["hello.yaml"], "params": {}, "variables": ["MESSAGE"]}]}).encode())
    finally:
        await nc.close()
    assert await publish(settings, "hello", b"x", [], None, 5.0) == 1
    assert capsys.readouterr().err == (
        f"gitfaas publish: no JetStream stream stores the topic's subject on {nats_server.url} (stream GITFAAS "
        "is created when the bridge or the consumer starts); nothing was published\n")

    refused = await asyncio.to_thread(gitfaas, "publish", "hello", "x", "--wait", "sometime")
    assert refused.returncode == 2 and "invalid choice: 'sometime'" in refused.stderr
    refused = await asyncio.to_thread(gitfaas, "publish", "hello", "x", "-p", "replicas")
    assert refused.returncode == 2 and refused.stderr == "gitfaas: -p takes name=value, not 'replicas'\n"


# ---- config.json `params`, validate and render -------------------------------------------------

def test_params_are_checked_when_the_commit_loads(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"topics": [
        {"name": "a", "configs": ["job.yaml"], "params": {"RANDOM": "x", "bad name": "y", "body.f": "z",
                                                          "replicas": 1, "fine": "1", "declared": None}},
        {"name": "b", "configs": ["job.yaml"], "params": ["replicas"]},
    ]}))
    (tmp_path / "job.yaml").write_text(job_manifest("job"))
    result = gitfaas("validate", str(tmp_path))
    assert result.returncode == 1
    out = result.stdout
    assert "topics[0] (a).params: parameter 'RANDOM' would override the built-in variable of that name" in out
    assert "topics[0] (a).params: parameter name 'bad name' is not valid" in out
    assert "topics[0] (a).params: parameter 'body.f' would shadow a field of the JSON body" in out
    assert ('topics[0] (a).params.replicas: expected a string (the default value, as a message would send it: '
            '"1") or null (no default), not 1') in out
    assert 'topics[1] (b).params: expected an object of parameter defaults, like {"replicas": "1"}, not ["replicas"]' \
        in out
    assert "5 problem(s)" in out


def test_validate_shows_parameters_and_render_uses_defaults(tmp_path: Path) -> None:
    for name, content in scale_files().items():
        (tmp_path / name).write_text(content)
    result = gitfaas("validate", str(tmp_path))
    assert result.returncode == 0, result.stdout
    assert '  scale: parameters owner (required), replicas="1" (default), size (required)\n' in result.stdout

    result = gitfaas("render", "scale", "--repo", str(tmp_path), "--message", FILE_BODY)
    assert result.returncode == 1
    assert result.stderr == f"gitfaas render: {MISSING_BOTH}\n"

    result = gitfaas("render", "scale", "--repo", str(tmp_path), "--message", FILE_BODY, "-p", "owner=me",
                     "-p", "size=s")
    assert result.returncode == 0, result.stderr
    assert result.stderr == 'gitfaas render: defaults from config.json: replicas="1"\n'
    [job] = list(yaml.safe_load_all(result.stdout))
    assert job["spec"]["parallelism"] == 1 and env_of(job)["OWNER"] == "me"

    result = gitfaas("render", "scale", "--repo", str(tmp_path), "--message", FILE_BODY, "-p", "owner=me",
                     "-p", "size=s", "-p", "replicas=4")
    assert result.returncode == 0 and result.stderr == ""
    assert yaml.safe_load(result.stdout)["spec"]["parallelism"] == 4
