"""Issue 5: request status, Job tracking, responses, lineage and backpressure."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from gitfaas.embedded import EmbeddedNats
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle
from tests.test_core_loop import env_of


async def status_of(stack: Stack, request_id: str) -> dict[str, Any] | None:
    code, document = await stack.get_json(f"/requests/{request_id}")
    return document if code == 200 else None


async def reaches(stack: Stack, request_id: str, state: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        document = await status_of(stack, request_id)
        return document if document and document["state"] == state else None

    return await wait_for(check, message=f"request {request_id} to be {state}")


async def publish_id(stack: Stack, topic: str, body: str = "x", **params: str) -> str:
    response = await stack.publish(topic, body, params=params or None)
    assert response.status == 202, await response.text()
    return (await response.json())["request_id"]


async def test_job_outcomes_move_the_request_state(stack: Stack, k8s: EmulatorHandle) -> None:
    ok = await publish_id(stack, "hello")
    document = await reaches(stack, ok, "applied")
    assert document["commit"] == stack.consumers[0].config.commit
    [entry] = document["documents"]
    assert entry["kind"] == "Job" and entry["namespace"] == "default" and entry["function_uid"]
    await k8s.set_job_status(entry["name"], condition=None, active=1)
    await reaches(stack, ok, "running")
    await k8s.set_job_status(entry["name"], condition="Complete")
    document = await reaches(stack, ok, "succeeded")
    assert document["documents"][0]["state"] == "succeeded"

    bad = await publish_id(stack, "hello")
    [entry] = (await reaches(stack, bad, "applied"))["documents"]
    await k8s.set_job_status(entry["name"], condition="Failed", reason="BackoffLimitExceeded",
                             message="Job has reached the specified backoff limit")
    document = await reaches(stack, bad, "failed")
    assert "BackoffLimitExceeded" in document["documents"][0]["reason"]
    assert "backoff limit" in document["error"]


async def test_wait_applied_and_completed(stack: Stack, k8s: EmulatorHandle) -> None:
    response = await stack.http.post(f"{stack.bridge_url}/publish/hello?wait=applied&timeout=10", data=b"w")
    assert response.status == 200
    document = await response.json()
    assert document["state"] == "applied" and document["documents"][0]["kind"] == "Job"

    response = await stack.http.post(f"{stack.bridge_url}/publish/hello?wait=completed&timeout=1", data=b"w")
    assert response.status == 504, "the Job is still running"
    document = await response.json()
    assert document["state"] in ("pending", "applied") and document["request_id"]

    # A waiter that is answered as soon as the Job completes:
    waiter = asyncio.create_task(stack.http.post(f"{stack.bridge_url}/publish/hello?wait=completed&timeout=20",
                                                 data=b"done"))
    job = await wait_for(lambda: [j for j in k8s.jobs() if env_of(j)["MESSAGE"] == "ZG9uZQ=="], message="Job")
    await k8s.set_job_status(job[0]["metadata"]["name"], condition="Complete")
    response = await waiter
    assert response.status == 200 and (await response.json())["state"] == "succeeded"

    response = await stack.http.post(f"{stack.bridge_url}/publish/hello?wait=sometime", data=b"w")
    assert response.status == 400


async def test_function_responses_round_trip(stack: Stack, k8s: EmulatorHandle) -> None:
    request_id = await publish_id(stack, "hello")
    await reaches(stack, request_id, "applied")
    [job] = k8s.jobs()
    function_uid = env_of(job)["FUNCTION_UID"]

    code, answer = await stack.get_json(f"/response/{request_id}")
    assert code == 200 and answer == {"responses": [None]}
    async with stack.http.post(f"{stack.bridge_url}/response/{function_uid}", json={"rows": 3}) as response:
        assert response.status == 200
    code, answer = await stack.get_json(f"/response/{request_id}")
    assert answer == {"responses": [{"rows": 3}]}
    async with stack.http.post(f"{stack.bridge_url}/response/{function_uid}", data="plain text") as response:
        assert response.status == 200
    code, answer = await stack.get_json(f"/response/{request_id}")
    assert answer == {"responses": ["plain text"]}

    async with stack.http.post(f"{stack.bridge_url}/response/not-a-function", data="x") as response:
        assert response.status == 404 and "unknown" in (await response.json())["error"]
    forged = function_uid.rsplit(".", 1)[0] + ".aaaaaaaaaaaaaaaa"  # the right request, a guessed secret
    async with stack.http.post(f"{stack.bridge_url}/response/{forged}", data="forged") as response:
        assert response.status == 404
    code, answer = await stack.get_json(f"/response/{request_id}")
    assert answer == {"responses": ["plain text"]}, "a forged uid stores nothing"
    async with stack.http.post(f"{stack.bridge_url}/response/{function_uid}", data=b"{bad",
                               headers={"Content-Type": "application/json"}) as response:
        assert response.status == 400
    code, _ = await stack.get_json("/response/no-such-request")
    assert code == 404


async def test_a_three_step_chain_is_one_tree(nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json({"a": ["a.yaml"], "b": ["b.yaml"], "c": ["c.yaml"]}),
                 "a.yaml": job_manifest("a"), "b.yaml": job_manifest("b"), "c.yaml": job_manifest("c")})
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        first = await publish_id(stack, "a")
        # Each step publishes the next with Gitfaas-Parent, as a function would.
        async with stack.http.post(f"{stack.bridge_url}/publish/b", data=b"2",
                                   headers={"Gitfaas-Parent": first}) as response:
            second = (await response.json())["request_id"]
        third = await publish_id(stack, "c", parent=second)
        await reaches(stack, third, "applied")

        async def tree() -> bool:
            top, middle = await status_of(stack, first), await status_of(stack, second)
            return bool(top and middle and top["children"] == [second] and middle["children"] == [third])

        await wait_for(tree, message="a -> b -> c linked by children")
        assert (await status_of(stack, third))["parent"] == second


async def test_status_expires_after_its_ttl(nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo,
                                            tmp_path: Path) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, request_ttl_seconds=1)
    async with running_stack(settings) as stack:
        request_id = await publish_id(stack, "hello")
        await reaches(stack, request_id, "applied")

        async def gone() -> bool:
            return await status_of(stack, request_id) is None

        await wait_for(gone, timeout=15, message="the status to expire")
        code, _ = await stack.get_json(f"/requests/{request_id}")
        assert code == 404


def active_jobs(k8s: EmulatorHandle) -> list[dict[str, Any]]:
    def ended(job: dict[str, Any]) -> bool:
        return any(c.get("type") in ("Complete", "Failed") and c.get("status") == "True"
                   for c in (job.get("status") or {}).get("conditions") or [])

    return [job for job in k8s.jobs() if not ended(job)]


async def test_max_active_jobs_holds_messages_until_jobs_finish(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json({"burst": ["burst.yaml"]}, burst={"maxActiveJobs": 2}),
                 "burst.yaml": job_manifest("burst")})
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        for index in range(10):
            await publish_id(stack, "burst", f"m{index}")
        most = 0

        async def sample() -> None:  # an observer, not synchronisation: it records the peak
            nonlocal most
            while True:
                most = max(most, len(active_jobs(k8s)))
                await asyncio.sleep(0.005)

        observer = asyncio.create_task(sample())
        try:
            completed = 0
            while completed < 10:
                [job, *_] = await wait_for(lambda: active_jobs(k8s), message=f"an active Job after {completed}")
                assert len(active_jobs(k8s)) <= 2
                await k8s.set_job_status(job["metadata"]["name"], condition="Complete")
                completed += 1
        finally:
            observer.cancel()
        assert len(k8s.jobs()) == 10 and not active_jobs(k8s)
        assert most <= 2, f"{most} Jobs of the topic were active at once"


async def test_a_topics_retries_rerun_a_failed_request_once_each(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json({"flaky": ["flaky.yaml"]}, flaky={"retries": 1}),
                 "flaky.yaml": job_manifest("flaky")})
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        first = await publish_id(stack, "flaky", "payload")
        [entry] = (await reaches(stack, first, "applied"))["documents"]
        await k8s.set_job_status(entry["name"], condition="Failed", reason="BackoffLimitExceeded")
        await reaches(stack, first, "failed")

        [rerun] = await wait_for(lambda: [j for j in k8s.jobs() if env_of(j)["REQUEST_UUID"] != first],
                                 message="the automatic re-run's Job")
        second = env_of(rerun)["REQUEST_UUID"]
        assert env_of(rerun)["MESSAGE"] == env_of(k8s.jobs()[0])["MESSAGE"], "the same message, run again"
        document = await reaches(stack, second, "applied")
        assert document["parent"] == first and document["retry"] == 1
        assert second in (await status_of(stack, first))["children"]

        await k8s.set_job_status(rerun["metadata"]["name"], condition="Failed", reason="BackoffLimitExceeded")
        failed = await reaches(stack, second, "failed")
        # The re-run decision is written together with the failure: `retries: 1` is spent.
        assert not failed.get("rerun") and (await status_of(stack, first))["rerun"] is True
        assert len(k8s.jobs()) == 2


async def test_many_writers_of_one_status_in_one_process_all_land(nats_server: EmbeddedNats) -> None:
    """Forty changes to one request's document at once (a fan-out's Jobs reporting together) are all
    stored, through the pipelined key-value writes: none is lost to "kept changing under us"."""
    import nats

    from gitfaas.jspublish import PipelinedKeyValue
    from gitfaas.natsconn import ensure_all
    from gitfaas.settings import Settings
    from gitfaas.status import StatusStore
    from gitfaas.subjects import REQUESTS_BUCKET

    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        _config, requests_kv = await ensure_all(js, Settings(nats_url=nats_server.url))
        fast = await PipelinedKeyValue.of(requests_kv, REQUESTS_BUCKET, nc, timeout=5)
        store = StatusStore(fast, max_bytes=nc.max_payload)
        request_id = "fan-out-1"

        def mark(index: int) -> Any:
            def change(document: dict[str, Any]) -> None:
                document.setdefault("marks", []).append(index)
            return change

        await asyncio.wait_for(asyncio.gather(*(
            store.update(request_id, mark(i), create=dict) for i in range(40))), 30)
        document = await store.get(request_id)
        assert document is not None and sorted(document["marks"]) == list(range(40))
        assert not len(store._turn)  # no turn left behind
        await fast.close()
    finally:
        await nc.close()
