"""Issue 3: every accepted message yields its objects exactly once — through crashes, restarts and faults."""

from __future__ import annotations

import asyncio
import io
import uuid
from pathlib import Path
from typing import Any

import nats
import pytest

from cli.operator import dead, replay
from gitfaas import natsconn
from gitfaas.embedded import EmbeddedNats
from gitfaas.settings import Settings
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle
from tests.processes import ConsumerProcess
from tests.test_core_loop import dead_letters, env_of


def request_ids(k8s: EmulatorHandle) -> list[str]:
    return [env_of(job)["REQUEST_UUID"] for job in k8s.jobs()]


async def publish_many(nats_url: str, topic: str, count: int, concurrency: int = 64) -> list[str]:
    """Publish straight to JetStream as a bridge would, `concurrency` at a time."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    ids = [str(uuid.uuid4()) for _ in range(count)]
    gate = asyncio.Semaphore(concurrency)

    async def one(request_id: str) -> None:
        async with gate:
            await js.publish(f"gitfaas.topics.{topic}", request_id.encode(),
                             headers={"Gitfaas-Request-Id": request_id})

    try:
        await asyncio.gather(*(one(i) for i in ids))
    finally:
        await nc.close()
    return ids


def consumer_env(nats: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path, name: str) -> dict[str, str]:
    return {
        "NATS_URL": nats.url,
        "GIT_URL": str(repo.path),
        "GIT_CACHE_DIR": str(tmp_path / f"cache-{name}"),
        "GIT_POLL_SECONDS": "0",
        "KUBECONFIG": str(k8s.kubeconfig),
        "EXECUTOR": "kubernetes",
        "KUBE_NAMESPACE": "default",
        "ACK_WAIT_SECONDS": "2",
        "MAX_CONCURRENCY": "16",
    }


async def ensure_stream(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        await natsconn.ensure_all(nc.jetstream(), Settings(nats_url=nats_url, ack_wait_seconds=2))
    finally:
        await nc.close()


def assert_exactly_once(k8s: EmulatorHandle, expected: list[str]) -> None:
    seen = request_ids(k8s)
    names = [job["metadata"]["name"] for job in k8s.jobs()]
    assert len(names) == len(set(names)), "a Job name appears twice"
    assert sorted(seen) == sorted(expected), (
        f"{len(set(expected) - set(seen))} missing, {len(seen) - len(set(seen))} applied twice"
    )


async def interrupt_and_restart(nats: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path, *,
                                count: int, interrupt_after: int, interrupt: str) -> None:
    """Publish `count`, interrupt the consumer (`kill` or `terminate`) mid-way, start a new one:
    every message must end as exactly one Job."""
    await ensure_stream(nats.url)
    env = consumer_env(nats, k8s, repo, tmp_path, "a")
    first = await ConsumerProcess(env, tmp_path / "consumer-1.log").start()
    second: ConsumerProcess | None = None
    try:
        ids = await publish_many(nats.url, "hello", count)
        await wait_for(lambda: len(k8s.jobs()) >= interrupt_after, timeout=30,
                       message=f"{interrupt_after} Jobs before the interruption")
        if interrupt == "kill":
            first.kill()
            assert len(k8s.jobs()) < count, "the crash must happen while applying"
        else:
            code, seconds = await first.terminate()
            assert code == 0 and seconds < 8, f"exit code {code} after {seconds:.1f}s"
        second = await ConsumerProcess(env, tmp_path / "consumer-2.log").start()
        await wait_for(lambda: len(k8s.jobs()) >= count, timeout=60, message=f"all {count} Jobs after the restart")
        assert_exactly_once(k8s, ids)
    finally:
        first.stop()
        if second:
            second.stop()


async def test_consumer_killed_while_applying_loses_and_doubles_nothing(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    await interrupt_and_restart(nats_server, k8s, repo, tmp_path, count=500, interrupt_after=100, interrupt="kill")


async def test_two_consumer_processes_share_the_work(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    await ensure_stream(nats_server.url)
    one = await ConsumerProcess(consumer_env(nats_server, k8s, repo, tmp_path, "1"), tmp_path / "c1.log").start()
    two = await ConsumerProcess(consumer_env(nats_server, k8s, repo, tmp_path, "2"), tmp_path / "c2.log").start()
    try:
        ids = await publish_many(nats_server.url, "hello", 300)
        await wait_for(lambda: len(k8s.jobs()) >= 300, timeout=60, message="300 Jobs")
        assert_exactly_once(k8s, ids)
        counts = [await one.applied(), await two.applied()]
        assert sum(counts) == 300 and min(counts) > 0, f"work split {counts}"
    finally:
        one.stop()
        two.stop()


async def test_sigterm_under_load_exits_promptly_and_loses_nothing(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    await interrupt_and_restart(nats_server, k8s, repo, tmp_path, count=300, interrupt_after=50,
                                interrupt="terminate")


async def test_broker_restart_mid_publish(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path)
    async with running_stack(settings) as stack:
        accepted: list[str] = []
        refused = 0
        stopped = restarted = False
        for index in range(400):
            response = await stack.publish("hello", f"message {index}")
            if response.status == 202:
                accepted.append((await response.json())["request_id"])
            else:
                assert response.status == 503, await response.text()
                refused += 1
            if index == 60 and not stopped:
                await nats_server.stop()
                stopped = True
            if stopped and not restarted and refused >= 5:
                await nats_server.start()
                restarted = True
                await wait_for(lambda: stack.bridge.nc.is_connected, message="bridge reconnected")
            if restarted and len(accepted) >= 150:
                break
        assert restarted and refused >= 5 and len(accepted) >= 150
        await wait_for(lambda: len(k8s.jobs()) >= len(accepted), timeout=60,
                       message=f"{len(accepted)} Jobs for the accepted publishes")
        assert_exactly_once(k8s, accepted)


async def test_api_faults_heal_and_a_permanent_error_goes_dead_at_once(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, apply_timeout_seconds=0.5)
    async with running_stack(settings) as stack:
        await _faults_heal(stack, k8s)


async def _faults_heal(stack: Stack, k8s: EmulatorHandle) -> None:
    k8s.emulator.fail_next(500, count=6)
    k8s.emulator.fail_next(429, count=6, retry_after=1)
    k8s.emulator.fail_next(409, count=3)
    k8s.emulator.fail_next(504, count=3, delay=2.0)  # hangs past the client's apply timeout
    accepted = []
    for index in range(20):
        response = await stack.publish("hello", f"m{index}")
        accepted.append((await response.json())["request_id"])
    await wait_for(lambda: len(k8s.jobs()) >= 20, timeout=60, message="20 Jobs after the faults heal")
    assert not k8s.emulator.faults, "every injected fault was met"
    assert_exactly_once(k8s, accepted)

    k8s.emulator.fail_next(422, count=1, message="spec.template: Invalid value: field is immutable")
    response = await stack.publish("hello", "doomed")
    doomed = (await response.json())["request_id"]
    [letter] = await dead_letters(stack.settings.nats_url, 1)
    assert "422" in letter.headers["Gitfaas-Error"] and "immutable" in letter.headers["Gitfaas-Error"]
    assert letter.headers["Gitfaas-Attempts"] == "1", "a permanent error is not retried"
    assert letter.headers["Gitfaas-Request-Id"] == doomed
    document = await wait_for(lambda: _state(stack, doomed, "dead"), message="the request's status to be dead")
    assert "immutable" in document["error"]
    assert doomed not in request_ids(k8s)


async def test_replay_creates_a_linked_request_with_new_names(stack: Stack, k8s: EmulatorHandle) -> None:
    response = await stack.publish("hello", "original body", params={"x": "1"})
    original = (await response.json())["request_id"]
    [first] = await wait_for(lambda: k8s.jobs(), message="the original Job")

    async with stack.http.post(f"{stack.bridge_url}/requests/{original}/replay") as answer:
        assert answer.status == 202
        replayed = await answer.json()
    assert replayed["parent"] == original and replayed["request_id"] != original
    await wait_for(lambda: len(k8s.jobs()) == 2, message="the replayed Job")
    [second] = [job for job in k8s.jobs() if env_of(job)["REQUEST_UUID"] == replayed["request_id"]]
    assert second["metadata"]["name"] != first["metadata"]["name"]
    assert env_of(second)["MESSAGE"] == env_of(first)["MESSAGE"]
    status = await wait_for(lambda: _applied_status(stack, replayed["request_id"]), message="replay status")
    assert status["parent"] == original

    async with stack.http.post(f"{stack.bridge_url}/requests/no-such-request/replay") as answer:
        assert answer.status == 404

    # The command line: every message of the topic in the last hour, as new requests.
    out = io.StringIO()
    assert await replay(stack.settings, None, "hello", "1h", False, out=out) == 0
    assert out.getvalue().count("replayed") == 2
    await wait_for(lambda: len(k8s.jobs()) == 4, message="two more Jobs from `replay --topic`")
    out = io.StringIO()
    assert await replay(stack.settings, None, "hello", "1h", True, out=out) == 0
    assert "nothing to replay" in out.getvalue(), "--failed skips requests that succeeded"


async def _applied_status(stack: Stack, request_id: str) -> dict[str, Any] | None:
    status, document = await stack.get_json(f"/requests/{request_id}")
    return document if status == 200 and document.get("state") == "applied" else None


async def test_dead_letter_listed_then_redriven_after_the_fix(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    # A body that is not JSON has no `body.tag`: the consumer gives the message up (the bridge has no
    # way to know; a missing parameter it would refuse before storing).
    broken = job_manifest("fixme").replace("image: busybox:1.36", "image: 'busybox:{{body.tag}}'")
    repo.commit({"config.json": config_json({"fixme": ["fixme.yaml"]}), "fixme.yaml": broken})
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        response = await stack.publish("fixme", "payload")
        request_id = (await response.json())["request_id"]
        await wait_for(lambda: _state(stack, request_id, "dead"), message="the request to go dead")

        out = io.StringIO()
        assert await dead(stack.settings, "list", None, False, False, out=out) == 0
        listing = out.getvalue()
        assert "fixme" in listing and "missing variables: body.tag" in listing
        seq = int(listing.splitlines()[1].split()[0])
        out = io.StringIO()
        assert await dead(stack.settings, "show", seq, False, False, out=out) == 0
        assert request_id in out.getvalue() and "payload" in out.getvalue()

        repo.commit({"fixme.yaml": job_manifest("fixme")}, "fix the manifest")
        status, _state_doc = await stack.get_json("/refresh")
        assert status == 200
        out = io.StringIO()
        assert await dead(stack.settings, "redrive", seq, False, False, out=out) == 0
        [job] = await wait_for(lambda: k8s.jobs(), message="the redriven Job")
        assert env_of(job)["REQUEST_UUID"] != request_id
        child = await wait_for(lambda: _state(stack, env_of(job)["REQUEST_UUID"], "applied"),
                               message="redriven request applied")
        assert child["parent"] == request_id
        out = io.StringIO()
        assert await dead(stack.settings, "list", None, False, False, out=out) == 0
        assert "no dead letters" in out.getvalue()


async def _state(stack: Stack, request_id: str, state: str) -> dict[str, Any] | None:
    status, document = await stack.get_json(f"/requests/{request_id}")
    return document if status == 200 and document.get("state") == state else None


@pytest.mark.parametrize("delay", [1, 5, 100])
def test_nak_delay_grows_and_is_capped(delay: int) -> None:
    from consumer.service import MAX_NAK_DELAY_SECONDS, nak_delay

    assert nak_delay(delay) <= MAX_NAK_DELAY_SECONDS
    assert nak_delay(delay + 1) >= nak_delay(delay)
