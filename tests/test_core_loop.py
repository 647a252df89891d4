"""Issue 2: HTTP publish → JetStream → consumer renders and applies → a Job chains the next topic."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from gitfaas.embedded import EmbeddedNats
from gitfaas.subjects import HEADER_ERROR
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle


def env_of(job: dict[str, Any]) -> dict[str, str]:
    container = job["spec"]["template"]["spec"]["containers"][0]
    return {item["name"]: item.get("value", "") for item in container.get("env", [])}


def jobs_named(k8s: EmulatorHandle, prefix: str) -> list[dict[str, Any]]:
    return [job for job in k8s.jobs() if job["metadata"]["name"].startswith(prefix)]


async def test_json_body_reaches_the_job_exactly(stack: Stack, k8s: EmulatorHandle) -> None:
    body = json.dumps({"file": {"name": "data.csv"}, "note": "ünïcode\n'quotes' \"double\""}).encode()
    response = await stack.publish("hello", body, headers={"Content-Type": "application/json"})
    assert response.status == 202
    answer = await response.json()
    assert answer["topic"] == "hello" and answer["duplicate"] is False and answer["stream_seq"] >= 1

    [job] = await wait_for(lambda: jobs_named(k8s, "hello-"), message="the hello Job")
    env = env_of(job)
    assert base64.b64decode(env["MESSAGE"]) == body
    assert env["REQUEST_UUID"] == answer["request_id"]
    assert env["BRIDGE_URL"] == stack.settings.bridge_url
    labels = job["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "gitfaas"
    assert labels["gitfaas.io/topic"] == "hello"
    assert labels["gitfaas.io/request-id"] == answer["request_id"]
    annotations = job["metadata"]["annotations"]
    assert annotations["gitfaas.io/stream-seq"] == str(answer["stream_seq"])
    assert annotations["gitfaas.io/commit"] == stack.consumers[0].config.commit


async def dead_letters(nats_url: str, count: int, timeout: float = 10.0) -> list[Any]:
    """Read `count` messages from the dead-letter stream."""
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.pull_subscribe("gitfaas.dead.>", stream="GITFAAS_DEAD")
        return await sub.fetch(count, timeout=timeout)
    finally:
        await nc.close()


async def test_query_parameters_fill_variables_with_their_yaml_type(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({
        "config.json": config_json({"scale": ["deploy.yaml"]}),
        "deploy.yaml": (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web-{{ RANDOM }}\n"
            "  labels:\n    owner: '{{owner}}'\n"
            "spec:\n  replicas: {{replicas}}\n  template:\n    spec:\n      containers:\n"
            "        - name: web\n          image: nginx:{{tag}}\n"
        ),
    })
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        response = await stack.publish("scale", params={"replicas": "2", "owner": "a: b # c", "tag": "1.27"})
        assert response.status == 202
        [deployment] = await wait_for(lambda: k8s.objects("apps/v1", "deployments"), message="the Deployment")
        assert deployment["spec"]["replicas"] == 2
        assert deployment["metadata"]["labels"]["owner"] == "a: b # c"
        assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.27"

        # Without `tag` and `owner`: the bridge refuses it naming both (tests/test_publish_checks.py)...
        response = await stack.publish("scale", params={"replicas": "3"})
        assert response.status == 400 and "owner, tag" in (await response.json())["error"]
        # ...and straight to NATS, where nothing checks first, the message fails naming both, nothing applied.
        nc = await nats.connect(stack.settings.nats_url)
        try:
            await nc.jetstream().publish("gitfaas.topics.scale", b"", headers={"Gitfaas-Param-replicas": "3"})
        finally:
            await nc.close()
        [dead] = await dead_letters(stack.settings.nats_url, 1)
        assert "missing variables: owner, tag" in dead.headers[HEADER_ERROR]
        assert len(k8s.objects("apps/v1", "deployments")) == 1


async def test_several_files_and_documents_and_shared_manifests(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: audit-{{RANDOM}}\ndata:\n  topic: '{{TOPIC}}'\n"
    repo.commit({
        "config.json": config_json({"first": ["job.yaml", "two.yaml"], "second": ["two.yaml"]}),
        "job.yaml": job_manifest("main"),
        "two.yaml": config_map + "---\n# a second document in the same file\n" + job_manifest("side"),
    })
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        assert (await stack.publish("first", "x")).status == 202
        await wait_for(lambda: len(k8s.jobs()) == 2 and len(k8s.objects("v1", "configmaps")) == 1,
                       message="all three documents of 'first'")
        assert (await stack.publish("second", "y")).status == 202
        await wait_for(lambda: len(k8s.jobs()) == 3 and len(k8s.objects("v1", "configmaps")) == 2,
                       message="both documents of 'second'")
        topics = sorted(cm["data"]["topic"] for cm in k8s.objects("v1", "configmaps"))
        assert topics == ["first", "second"]
        names = [job["metadata"]["name"] for job in k8s.jobs()]
        assert len(set(names)) == 3


async def test_a_function_chains_the_next_topic_over_nats_and_http(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({
        "config.json": config_json({"collect": ["collect.yaml"], "uncompress": ["uncompress.yaml"],
                                    "convert": ["convert.yaml"]}),
        "collect.yaml": job_manifest("collect"),
        "uncompress.yaml": job_manifest("uncompress"),
        "convert.yaml": job_manifest("convert"),
    })
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        assert (await stack.publish("collect", "start")).status == 202
        [collect] = await wait_for(lambda: jobs_named(k8s, "collect-"), message="collect Job")

        # Play the running function: read its environment, publish the next topic straight to NATS.
        env = env_of(collect)
        nc = await nats.connect(env["NATS_URL"])
        try:
            await nc.publish("gitfaas.topics.uncompress", b"archive.gz", headers={"Gitfaas-Param-x": "1"})
            await nc.flush()
        finally:
            await nc.close()
        [uncompress] = await wait_for(lambda: jobs_named(k8s, "uncompress-"), message="uncompress Job")
        assert base64.b64decode(env_of(uncompress)["MESSAGE"]) == b"archive.gz"
        assert env_of(uncompress)["REQUEST_UUID"].startswith("seq-")

        # ...and the next one through the bridge URL it was given.
        bridge_url = env_of(uncompress)["BRIDGE_URL"]
        async with stack.http.post(f"{bridge_url}/publish/convert", data=b"data.csv") as response:
            assert response.status == 202
        [convert] = await wait_for(lambda: jobs_named(k8s, "convert-"), message="convert Job")
        assert base64.b64decode(env_of(convert)["MESSAGE"]) == b"data.csv"


async def test_refresh_picks_up_a_new_commit_and_a_broken_one_keeps_serving(
    stack: Stack, repo: GitRepo, k8s: EmulatorHandle
) -> None:
    assert (await stack.publish("later", "x")).status == 404
    commit = repo.commit({
        "config.json": config_json({"hello": ["hello.yaml"], "later": ["later.yaml"]}),
        "later.yaml": job_manifest("later"),
    }, "add topic later")
    status, state = await stack.get_json("/refresh")
    assert status == 200 and state["commit"] == commit and state["error"] is None
    assert (await stack.publish("later", "x")).status == 202
    await wait_for(lambda: jobs_named(k8s, "later-"), message="the new topic's Job")

    broken = repo.commit({"config.json": '{"topics": [ oops'}, "break config")
    status, state = await stack.get_json("/refresh")
    assert status == 200
    assert state["commit"] == commit, "the last good commit keeps serving"
    assert broken[:12] in state["error"] and "not valid JSON" in state["error"]
    status, topics = await stack.get_json("/topics")
    assert status == 200 and "not valid JSON" in topics["error"]
    status, ready = await stack.get_json("/readyz")
    assert status == 200 and "not valid JSON" in ready["error"], "still ready: the last good commit serves"
    assert sorted(t["name"] for t in topics["topics"]) == ["hello", "later"]
    assert (await stack.publish("hello", "still works")).status == 202
    await wait_for(lambda: len(jobs_named(k8s, "hello-")) == 1, message="hello Job after a broken commit")


async def test_unknown_topic_bad_name_and_oversized_body(stack: Stack, k8s: EmulatorHandle) -> None:
    response = await stack.publish("nope", "x")
    assert response.status == 404 and "nope" in (await response.json())["error"]
    response = await stack.publish("bad*name", "x")
    assert response.status == 400 and "topic name" in (await response.json())["error"]
    response = await stack.publish("hello", b"x" * (stack.settings.max_payload_bytes + 1))
    assert response.status == 413 and "MAX_PAYLOAD_BYTES" in (await response.json())["error"]
    response = await stack.publish("hello", b"x" * stack.settings.max_payload_bytes)
    assert response.status == 202
    response = await stack.publish("hello", "x", params={"parent": "a\r\nNats-Msg-Id: forged"})
    assert response.status == 400 and "parent" in (await response.json())["error"]
    response = await stack.publish("hello", "x", params={"RANDOM": "mine"})
    assert response.status == 400 and "RANDOM" in (await response.json())["error"]
    response = await stack.publish("hello", b"{not json", headers={"Content-Type": "application/json"})
    assert response.status == 400 and "JSON" in (await response.json())["error"]
    response = await stack.publish("hello", b"--x--", headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert response.status == 415
    await wait_for(lambda: len(k8s.jobs()) == 1, message="only the one accepted message applied")


async def test_bridge_answers_503_while_nats_is_down(stack: Stack, nats_server: EmbeddedNats) -> None:
    await nats_server.stop()
    await wait_for(lambda: not stack.bridge.nc.is_connected, message="bridge to notice NATS is gone")
    response = await stack.publish("hello", "x")
    assert response.status == 503
    assert "not accepted" in (await response.json())["error"]
    status, ready = await stack.get_json("/readyz")
    assert status == 503 and ready["nats"] == "disconnected"


@pytest.mark.parametrize("route", ["/healthz", "/readyz", "/metrics"])
async def test_health_routes(stack: Stack, route: str) -> None:
    async with stack.http.get(stack.bridge_url + route) as response:
        assert response.status == 200


async def test_idempotency_key_answers_the_first_request_and_creates_nothing_new(
    stack: Stack, k8s: EmulatorHandle
) -> None:
    first = await stack.publish("hello", "once", headers={"Idempotency-Key": "order-42"})
    second = await stack.publish("hello", "once", headers={"Idempotency-Key": "order-42"})
    one, two = await first.json(), await second.json()
    assert first.status == second.status == 202
    assert one["duplicate"] is False and two["duplicate"] is True
    assert two["request_id"] == one["request_id"] and two["stream_seq"] == one["stream_seq"]
    third = await stack.publish("hello", "other")
    await wait_for(lambda: len(k8s.jobs()) == 2, message="two Jobs: the keyed request once, the other once")
    assert sorted(env_of(job)["REQUEST_UUID"] for job in k8s.jobs()) == sorted(
        [one["request_id"], (await third.json())["request_id"]])


def test_an_applied_object_keeps_every_field_when_its_function_uid_is_set() -> None:
    import dataclasses

    from consumer.executors.base import Applied

    applied = Applied("batch/v1", "Job", "ns", "name", uid="u-1", warnings=("w",))
    assert applied.with_function_uid("r.0.x") == dataclasses.replace(applied, function_uid="r.0.x")
    assert {f.name for f in dataclasses.fields(Applied)} == {
        "api_version", "kind", "namespace", "name", "uid", "function_uid", "warnings"}, "with_function_uid names each"
