"""Issue 15: runs — a root request and everything published under it — against real NATS and the emulator.

Each step of a chain is published the way a function does it (`?parent=` / `Gitfaas-Parent`), and
the emulator plays the Job controller (`set_job_status`), so the run's state is followed through
exactly what a cluster would report.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import nats
import pytest

from gitfaas.embedded import EmbeddedNats
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle

TOPICS = {"a": ["a.yaml"], "b": ["b.yaml"], "c": ["c.yaml"], "slow": ["slow.yaml"]}


def chain_repo(tmp_path: Path) -> GitRepo:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json(TOPICS), **{f"{t}.yaml": job_manifest(t) for t in TOPICS}})
    return repo


async def publish(stack: Stack, topic: str, parent: str | None = None, body: str = "x") -> str:
    response = await stack.publish(topic, body, params={"parent": parent} if parent else None)
    assert response.status == 202, await response.text()
    return str((await response.json())["request_id"])


async def run_of(stack: Stack, run_id: str) -> dict[str, Any]:
    code, run = await stack.get_json(f"/runs/{run_id}")
    assert code == 200, run
    return dict(run)


async def job_of(stack: Stack, request_id: str) -> str:
    """The name of the request's Job, once the request is applied."""
    async def named() -> str | None:
        code, document = await stack.get_json(f"/requests/{request_id}")
        jobs = [d["name"] for d in document.get("documents", []) if d.get("kind") == "Job"] if code == 200 else []
        return jobs[0] if jobs else None

    return str(await wait_for(named, message=f"the Job of {request_id}"))


async def request_state(stack: Stack, request_id: str, state: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        code, document = await stack.get_json(f"/requests/{request_id}")
        return document if code == 200 and document["state"] == state else None

    return dict(await wait_for(reached, message=f"request {request_id} to be {state}"))


async def run_state(stack: Stack, run_id: str, state: str, **fields: Any) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        run = await run_of(stack, run_id)
        ok = run["state"] == state and all(run.get(k) == v for k, v in fields.items())
        return run if ok else None

    return dict(await wait_for(reached, timeout=15, message=f"run {run_id} to be {state} {fields}"))


@pytest.fixture
async def chain(nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path) -> Any:
    repo = chain_repo(tmp_path)
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path, max_concurrency=1)) as stack:
        yield stack


async def test_a_run_is_finished_only_after_its_last_step_even_when_a_job_publishes_and_exits_at_once(
        chain: Stack, k8s: EmulatorHandle) -> None:
    stack = chain
    a = await publish(stack, "a")
    job_a = await job_of(stack, a)
    run = await run_of(stack, a)
    assert run["state"] == "running" and run["run_id"] == a and [r["request_id"] for r in run["requests"]] == [a]

    # The race: a's Job publishes b and exits at once, while the consumer is busy (MAX_CONCURRENCY=1, so it
    # holds two messages: one whose apply the API server holds for 2 s, one waiting for its turn): when a's
    # end is seen, b is stored but not handled yet.
    slow = k8s.emulator.fail_next(500, 2, path=r"/apis/batch/v1/namespaces/default/jobs/slow-.*", delay=2.0)
    await publish(stack, "slow")
    await publish(stack, "slow")
    await wait_for(lambda: slow.hits == 1, message="the slow apply to be held by the API server")
    b = await publish(stack, "b", parent=a)
    await k8s.set_job_status(job_a, condition="Complete")
    await request_state(stack, a, "succeeded")
    run = await run_state(stack, a, "running", unhandled_children=1)
    assert [r["request_id"] for r in run["requests"]] == [a], "b is not handled yet: the consumer is busy"
    assert run["finished_at"] is None

    # b is handled once the slot frees; its Job publishes c, then ends; then c's Job ends.
    job_b = await job_of(stack, b)
    run = await run_state(stack, a, "running", unhandled_children=0)
    assert [r["request_id"] for r in run["requests"]] == [a, b]
    c = await publish(stack, "c", parent=b)
    await k8s.set_job_status(job_b, condition="Complete")
    job_c = await job_of(stack, c)
    await request_state(stack, b, "succeeded")
    run = await run_state(stack, a, "running")
    assert [r["request_id"] for r in run["requests"]] == [a, b, c]
    await k8s.set_job_status(job_c, condition="Complete", active=0)
    run = await run_state(stack, a, "succeeded")
    assert run["steps"] == 3 and run["failed_step"] is None
    assert run["finished_at"] and run["started_at"] and run["duration_seconds"] is not None
    by_id = {r["request_id"]: r for r in run["requests"]}
    assert by_id[b]["parent"] == a and by_id[c]["parent"] == b
    for document in run["requests"]:
        assert document["root"] == a and document["state"] == "succeeded"
        assert document["published_at"] <= document["applied_at"] <= document["finished_at"]
        assert document["published_at"].endswith("Z")
    assert slow.hits == 2  # the fault happened: both slow messages were held


async def test_a_run_whose_middle_step_fails_names_that_step(chain: Stack, k8s: EmulatorHandle) -> None:
    if True:
        a = await publish(chain, "a")
        b = await publish(chain, "b", parent=a)
        await k8s.set_job_status(await job_of(chain, a), condition="Complete")
        await k8s.set_job_status(await job_of(chain, b), condition="Failed", reason="BackoffLimitExceeded",
                                 message="Job has reached the specified backoff limit")
        run = await run_state(chain, a, "failed")
        assert run["failed_step"]["request_id"] == b and run["failed_step"]["topic"] == "b"
        assert "BackoffLimitExceeded" in run["failed_step"]["error"]
        code, listed = await chain.get_json("/runs?state=failed")
        assert code == 200 and [r["run_id"] for r in listed["runs"]] == [a]


async def test_wait_run_answers_when_the_whole_run_ended(chain: Stack, k8s: EmulatorHandle) -> None:
    stack = chain
    waiter = asyncio.create_task(stack.http.post(f"{stack.bridge_url}/publish/a?wait=run&timeout=30", data=b"w"))
    job = await wait_for(lambda: [j for j in k8s.jobs() if j["metadata"]["name"].startswith("a-")], message="a's Job")
    a = job[0]["metadata"]["annotations"]["gitfaas.io/request-id"]
    b = await publish(stack, "b", parent=a)
    await k8s.set_job_status(job[0]["metadata"]["name"], condition="Complete")
    await request_state(stack, a, "succeeded")
    assert not waiter.done(), "b still runs"
    await k8s.set_job_status(await job_of(stack, b), condition="Complete")
    response = await waiter
    run = await response.json()
    assert response.status == 200 and run["state"] == "succeeded" and run["run_id"] == a and run["steps"] == 2

    failing = asyncio.create_task(stack.http.post(f"{stack.bridge_url}/publish/b?wait=run&timeout=30", data=b"f"))
    job = await wait_for(lambda: [j for j in k8s.jobs() if j["metadata"]["name"].startswith("b-")
                                  and not j.get("status")], message="the new b Job")
    await k8s.set_job_status(job[0]["metadata"]["name"], condition="Failed", reason="BackoffLimitExceeded")
    response = await failing
    assert response.status == 422 and (await response.json())["state"] == "failed"

    response = await stack.http.post(f"{stack.bridge_url}/publish/c?wait=run&timeout=1", data=b"t")
    assert response.status == 504 and (await response.json())["state"] == "running"
    code, run = await stack.get_json(f"/runs/{a}?wait=1&timeout=5")
    assert code == 200 and run["state"] == "succeeded"


async def test_cancel_deletes_the_active_job_and_later_children_are_not_applied(stack: Stack, k8s: EmulatorHandle
                                                                               ) -> None:
    run_id = await publish(stack, "hello")
    job = await job_of(stack, run_id)
    await k8s.set_job_status(job, condition=None, active=1)
    await request_state(stack, run_id, "running")
    await k8s.add_pod(job, "working\n")

    async with stack.http.post(f"{stack.bridge_url}/runs/{run_id[:8]}/cancel") as response:
        answer = await response.json()
        assert response.status == 202, answer
    assert answer["state"] == "cancelled" and answer["jobs_deleted"] == [{"namespace": "default", "name": job}]
    assert ("jobs", "default", job, "Background") in k8s.emulator.deletions
    # Gone, or going: marked for deletion while a finalizer holds it until its outcome is recorded.
    assert all(j["metadata"].get("deletionTimestamp") for j in k8s.jobs() if j["metadata"]["name"] == job)
    assert k8s.objects("v1", "pods") == [], "its pods went with it (background propagation)"
    document = await request_state(stack, run_id, "cancelled")
    assert document["finished_at"] and "cancelled" in document["error"]

    # A child the Job published before it was stopped arrives later: recorded cancelled, nothing applied.
    before = len(k8s.jobs())
    child = await publish(stack, "hello", parent=run_id)
    document = await request_state(stack, child, "cancelled")
    assert document["documents"] == [] and document["root"] == run_id
    assert len(k8s.jobs()) == before
    nc = await nats.connect(stack.settings.nats_url)
    try:
        info = await nc.jetstream().stream_info(stack.settings.dead_stream)
        assert info.state.messages == 0, "not a dead letter"
    finally:
        await nc.close()
    run = await run_of(stack, run_id)
    assert run["state"] == "cancelled" and [r["state"] for r in run["requests"]] == ["cancelled", "cancelled"]

    async with stack.http.post(f"{stack.bridge_url}/runs/{run_id}/cancel") as response:
        assert response.status == 202 and (await response.json())["state"] == "cancelled", "idempotent"
    done = await publish(stack, "hello")
    await k8s.set_job_status(await job_of(stack, done), condition="Complete")
    await run_state(stack, done, "succeeded")
    async with stack.http.post(f"{stack.bridge_url}/runs/{done}/cancel") as response:
        answer = await response.json()
        assert response.status == 409 and "nothing to cancel" in answer["error"]


async def test_runs_are_listed_newest_first_and_filtered(chain: Stack, k8s: EmulatorHandle) -> None:
    stack = chain
    first = await publish(stack, "a")
    await k8s.set_job_status(await job_of(stack, first), condition="Complete")
    await run_state(stack, first, "succeeded")
    second = await publish(stack, "b")
    await job_of(stack, second)
    child = await publish(stack, "c", parent=second)
    await job_of(stack, child)

    code, listed = await stack.get_json("/runs")
    assert code == 200
    assert [r["run_id"] for r in listed["runs"]] == [second, first], "roots only, newest first"
    row = listed["runs"][0]
    assert row["topic"] == "b" and row["state"] == "running" and row["steps"] == 2 and row["started_at"]
    assert set(row) >= {"run_id", "topic", "state", "started_at", "finished_at", "steps"}
    assert [r["run_id"] for r in (await stack.get_json("/runs?topic=a"))[1]["runs"]] == [first]
    assert [r["run_id"] for r in (await stack.get_json("/runs?state=running"))[1]["runs"]] == [second]
    assert [r["run_id"] for r in (await stack.get_json("/runs?limit=1"))[1]["runs"]] == [second]
    assert (await stack.get_json("/runs?since=1h"))[1]["runs"] and not (
        await stack.get_json("/runs?since=2099-01-01T00:00:00"))[1]["runs"]
    assert (await stack.get_json("/runs?state=sleeping"))[0] == 400
    assert (await stack.get_json("/runs?limit=0"))[0] == 400


async def test_ids_may_be_given_by_a_unique_prefix(stack: Stack, k8s: EmulatorHandle) -> None:
    request_id = await publish(stack, "hello")
    await job_of(stack, request_id)
    code, document = await stack.get_json(f"/requests/{request_id[:8]}")
    assert code == 200 and document["request_id"] == request_id
    assert (await stack.get_json(f"/runs/{request_id[:10]}"))[1]["run_id"] == request_id
    code, answer = await stack.get_json(f"/requests/{request_id[:7]}")
    assert code == 404 and "at least 8" in answer["error"]

    # Two ids that share their first 8 characters: the prefix is refused, naming both.
    nc = await nats.connect(stack.settings.nats_url)
    try:
        js = nc.jetstream()
        for rid in ("cafe0123-one", "cafe0123-two"):
            await js.publish("gitfaas.topics.hello", b"x", headers={"Gitfaas-Request-Id": rid})
    finally:
        await nc.close()
    for rid in ("cafe0123-one", "cafe0123-two"):
        await job_of(stack, rid)
    code, answer = await stack.get_json("/requests/cafe0123")
    assert code == 400 and "ambiguous" in answer["error"]
    assert "cafe0123-one" in answer["error"] and "cafe0123-two" in answer["error"]
    code, answer = await stack.get_json("/requests/cafe0123-t")
    assert code == 200 and answer["request_id"] == "cafe0123-two"
    code, answer = await stack.get_json("/runs/cafe0123")
    assert code == 400 and "ambiguous" in answer["error"]
    code, answer = await stack.get_json("/requests/deadbeef-nothing")
    assert code == 404


async def test_logs_of_kubernetes_jobs_come_from_their_pods(stack: Stack, k8s: EmulatorHandle) -> None:
    request_id = await publish(stack, "hello")
    job = await job_of(stack, request_id)
    await k8s.add_pod(job, "line one\nline two\n")
    async with stack.http.get(f"{stack.bridge_url}/requests/{request_id[:8]}/logs") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        assert await response.text() == f"[{job}] line one\n[{job}] line two\n"
    child = await publish(stack, "hello", parent=request_id)
    child_job = await job_of(stack, child)
    await k8s.add_pod(child_job, {"main": "boom\n", "side": "side car\n"})
    await k8s.set_job_status(child_job, condition="Failed", reason="BackoffLimitExceeded", message="limit")
    document = await request_state(stack, child, "failed")
    assert "last output: boom | side car" in document["documents"][0]["reason"]
    async with stack.http.get(f"{stack.bridge_url}/requests/{request_id}/logs?run=1") as response:
        text = await response.text()
    assert text.splitlines() == [f"[{job}] line one", f"[{job}] line two", f"[{child_job}/main] boom",
                                 f"[{child_job}/side] side car"]


async def test_topics_show_the_next_tick_of_schedules(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": json.dumps({"topics": [
        {"name": "nightly", "configs": ["n.yaml"], "schedule": "0 3 * * *", "timezone": "Europe/Paris",
         "message": {"rows": 5}},
        {"name": "plain", "configs": ["n.yaml"]}]}), "n.yaml": job_manifest("n")})
    async with running_stack(make_settings(nats_server, None, repo.path, tmp_path)) as stack:
        _code, topics = await stack.get_json("/topics")
    nightly, plain = topics["topics"]
    assert nightly["schedule"] == "0 3 * * *" and nightly["timezone"] == "Europe/Paris"
    assert nightly["next_tick"].endswith(("01:00:00.000Z", "02:00:00.000Z")) and nightly["message"] == {"rows": 5}
    assert "next_tick" not in plain


def test_validate_checks_schedules(tmp_path: Path) -> None:
    import subprocess
    import sys

    def validate(topics: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        folder = tmp_path / f"repo{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"topics": topics}))
        (folder / "job.yaml").write_text(job_manifest("job").replace("echo $MESSAGE", "echo {{who}}"))
        return subprocess.run([sys.executable, "-m", "cli", "validate", str(folder)], capture_output=True,
                              text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent)

    ok = validate([{"name": "t", "configs": ["job.yaml"], "schedule": "*/5 * * * *", "timezone": "Europe/Paris",
                    "params": {"who": "cron"}}])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = validate([{"name": "t", "configs": ["job.yaml"], "schedule": "61 * * * *", "params": {"who": "x"}}])
    assert bad.returncode == 1 and "schedule" in bad.stdout + bad.stderr and "61 * * * *" in bad.stdout + bad.stderr
    zone = validate([{"name": "t", "configs": ["job.yaml"], "schedule": "0 * * * *", "timezone": "Mars/Olympus",
                      "params": {"who": "x"}}])
    assert zone.returncode == 1 and "Mars/Olympus" in zone.stdout + zone.stderr
    needs = validate([{"name": "t", "configs": ["job.yaml"], "schedule": "0 * * * *"}])
    assert needs.returncode == 1 and "needs a default" in needs.stdout + needs.stderr and "who" in needs.stdout


async def test_cli_publish_waits_for_the_run(chain: Stack, k8s: EmulatorHandle) -> None:
    import io

    from cli.operator import publish as cli_publish

    out = io.StringIO()
    waiting = asyncio.create_task(cli_publish(chain.settings, "a", b"cli", [], "run", 30.0, out=out))
    job = await wait_for(lambda: [j for j in k8s.jobs() if j["metadata"]["name"].startswith("a-")], message="a's Job")
    await k8s.set_job_status(job[0]["metadata"]["name"], condition="Complete")
    assert await waiting == 0, out.getvalue()
    assert "succeeded" in out.getvalue() and "steps 1" in out.getvalue()


async def test_cli_logs_follow_until_the_request_is_finished(stack: Stack, k8s: EmulatorHandle) -> None:
    import io

    from cli.runs import logs as cli_logs

    request_id = await publish(stack, "hello")
    job = await job_of(stack, request_id)
    await k8s.set_job_status(job, condition=None, active=1)
    await request_state(stack, request_id, "running")
    await k8s.add_pod(job, "one\n", name=f"{job}-pod")
    out = io.StringIO()
    following = asyncio.create_task(cli_logs(stack.settings, request_id[:8], False, True, out=out))
    await wait_for(lambda: "one" in out.getvalue(), message="the first line")
    assert not following.done(), "still running: it follows"
    k8s.emulator.pod_logs[("default", f"{job}-pod", "main")] = "one\ntwo\n"
    await wait_for(lambda: "two" in out.getvalue(), message="the new line")
    await k8s.set_job_status(job, condition="Complete")
    assert await asyncio.wait_for(following, 15) == 0
    assert out.getvalue().splitlines() == [f"[{job}] one", f"[{job}] two"], "each line once"


def test_run_timestamps_are_written_as_datetime_writes_them() -> None:
    """`rfc3339` formats each second once (hot path); the text is datetime's, rounding included."""
    import random
    from datetime import UTC, datetime

    from gitfaas.runs import rfc3339

    def reference(seconds: float) -> str:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

    chosen = random.Random(7)
    values = [chosen.uniform(0, 4e9) for _ in range(20_000)]
    values += [1_764_400_000 + n / 1e4 for n in range(20_000)]  # consecutive times within seconds
    values += [0.0, 0.0005, 0.0004999, 1.9999995, 1.9999994999, 1_764_400_000.9999996, 253_402_300_799.999]
    assert [rfc3339(v) for v in values] == [reference(v) for v in values]


def test_now_is_the_text_of_now_even_when_asked_many_times_a_millisecond() -> None:
    """`utc_now` keeps the last millisecond's text (several calls per message): it still moves with the clock."""
    import time

    from gitfaas.runs import rfc3339, utc_now

    texts = []
    for _ in range(5_000):
        before = rfc3339(time.time() - 0.001)
        now = utc_now()
        after = rfc3339(time.time() + 0.001)
        assert before <= now <= after
        texts.append(now)
    assert texts == sorted(texts)
    deadline = time.monotonic() + 1
    while utc_now() == texts[-1] and time.monotonic() < deadline:  # about a millisecond: the clock moving
        pass
    assert utc_now() > texts[-1]
