"""Issue 14 against the emulator: what a real cluster showed, kept in `make test`.

The same points run against a real API server in `tests/k8s/` (`make test-k8s`); here each is
pinned where the emulator can show it: API errors keep their meaning, apply warnings are stored,
429s slow every apply, the stall signal counts only time with work waiting, a dead message lists
what it applied, Jobs carry gitfaas's finalizer until their outcome is stored, FailedCreate events
explain blocked Jobs, and Jobs gone without an outcome make their request `unknown`.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path
from typing import Any

import pytest

from cli.authoring import validate
from consumer.apierrors import ApiStatus, fold, warning_texts
from consumer.jobwatch import FINALIZER
from gitfaas.embedded import EmbeddedNats
from gitfaas.settings import Settings
from tests.conftest import GitRepo, Stack, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle

IMMUTABLE_MESSAGE = ('The Job "fixed" is invalid: spec.template: Invalid value: {"labels":' + '{"a":"b"},' * 300
                     + '"Spec":{}}: field is immutable')
IMMUTABLE_DETAILS = {"name": "fixed", "group": "batch", "kind": "Job", "causes": [
    {"reason": "FieldValueInvalid", "field": "spec.template",
     "message": 'Invalid value: {"labels":' + '{"a":"b"},' * 300 + '"Spec":{}}: field is immutable'}]}


# ---- 1. API errors keep their meaning ---------------------------------------------------------


def test_a_long_status_is_folded_around_what_matters_never_cut() -> None:
    status = ApiStatus.parse(422, json.dumps({"kind": "Status", "code": 422, "reason": "Invalid",
                                              "message": IMMUTABLE_MESSAGE, "details": IMMUTABLE_DETAILS}))
    assert len(IMMUTABLE_MESSAGE) > 3000 and status.immutable_template
    text = status.text()
    assert len(text) < 700 and text.startswith("HTTP 422 Invalid: The Job \"fixed\" is invalid")
    assert "spec.template: Invalid value: {…}: field is immutable" in text
    # Without causes, the end of the message survives too.
    assert fold(IMMUTABLE_MESSAGE, 200).endswith("field is immutable")
    assert warning_texts(['299 - "would violate PodSecurity \\"restricted:latest\\": runAsNonRoot != true"']) == [
        'would violate PodSecurity "restricted:latest": runAsNonRoot != true']


async def test_an_immutable_template_is_a_sentence_and_a_validation_error_keeps_its_causes(
        stack: Stack, k8s: EmulatorHandle, repo: GitRepo) -> None:
    repo.commit({"config.json": config_json({"hello": ["hello.yaml"], "fixed": ["fixed.yaml"]}),
                 "fixed.yaml": job_manifest("hello").replace("hello-{{RANDOM}}", "fixed")})
    await stack.get_json("/refresh")
    first = await stack.publish("fixed", "one")
    first_id = (await first.json())["request_id"]
    await wait_for(lambda: k8s.jobs(), message="the fixed Job")
    # What a real API server answers when the template differs (the emulator does not check it).
    k8s.emulator.fail_next(422, reason="Invalid", message=IMMUTABLE_MESSAGE, details=IMMUTABLE_DETAILS)
    second = await stack.publish("fixed", "two")
    second_id = (await second.json())["request_id"]
    store = stack.consumers[0].tracker.store
    assert store is not None
    _, document = await store.wait(second_id, lambda d: d["state"] == "dead", 10)
    assert document is not None and document["state"] == "dead"
    assert document["error"].startswith("Job fixed already exists (created by request " + first_id)
    assert "{{RANDOM}}" in document["error"] and "HTTP 422" in document["error"]
    [job] = k8s.jobs()
    assert job["metadata"]["annotations"]["gitfaas.io/request-id"] == first_id, "never taken over"

    k8s.emulator.fail_next(422, reason="Invalid", message="Job.batch \"x\" is invalid: " + "x" * 2000, details={
        "causes": [{"field": "spec.template.spec.containers[0].image", "message": "Required value"}]})
    third = await stack.publish("hello", "three")
    _, document = await store.wait((await third.json())["request_id"], lambda d: d["state"] == "dead", 10)
    assert document is not None
    assert "spec.template.spec.containers[0].image: Required value" in document["error"]


async def test_a_suspended_job_of_another_request_is_never_taken_over(stack: Stack, k8s: EmulatorHandle,
                                                                      repo: GitRepo) -> None:
    manifest = job_manifest("hello").replace("hello-{{RANDOM}}", "held").replace("  backoffLimit: 0",
                                                                                  "  backoffLimit: 0\n  suspend: true")
    repo.commit({"config.json": config_json({"held": ["held.yaml"]}), "held.yaml": manifest})
    await stack.get_json("/refresh")
    first_id = (await (await stack.publish("held", "one")).json())["request_id"]
    await wait_for(lambda: k8s.jobs(), message="the suspended Job")
    second_id = (await (await stack.publish("held", "two")).json())["request_id"]
    store = stack.consumers[0].tracker.store
    assert store is not None
    _, document = await store.wait(second_id, lambda d: d["state"] == "dead", 10)
    assert document is not None and f"belongs to request {first_id}" in document["error"]
    assert k8s.jobs()[0]["metadata"]["annotations"]["gitfaas.io/request-id"] == first_id


# ---- 4. warnings and blocked Jobs --------------------------------------------------------------


async def test_apply_warnings_are_stored_and_failed_create_events_explain_a_blocked_job(
        stack: Stack, k8s: EmulatorHandle) -> None:
    warning = 'would violate PodSecurity "restricted:latest": runAsNonRoot != true'
    k8s.emulator.apply_warnings.append(warning)
    request_id = (await (await stack.publish("hello", "x")).json())["request_id"]
    store = stack.consumers[0].tracker.store
    assert store is not None
    _, document = await store.wait(request_id, lambda d: d["state"] == "applied", 10)
    assert document is not None and document["documents"][0]["warnings"] == [warning]
    [job] = k8s.jobs()
    name = job["metadata"]["name"]
    assert job["metadata"]["finalizers"] == [FINALIZER]
    await k8s.set_job_status(name, condition=None)  # started, no pod
    async with k8s.api_client() as api:
        from kubernetes_asyncio.client import CoreV1Api

        await CoreV1Api(api).create_namespaced_event("default", {
            "metadata": {"name": f"{name}.1", "namespace": "default"}, "reason": "FailedCreate", "type": "Warning",
            "message": f'Error creating: pods "{name}-x" is forbidden: violates PodSecurity "baseline:latest"',
            "involvedObject": {"kind": "Job", "name": name, "namespace": "default", "apiVersion": "batch/v1"}})
    _, document = await store.wait(
        request_id, lambda d: "FailedCreate" in str(d["documents"][0].get("reason")), 10)
    assert document is not None, "the blocked Job's reason"
    assert "violates PodSecurity" in document["documents"][0]["reason"]

    # 3. The finalizer goes once the outcome is stored.
    await k8s.set_job_status(name, condition="Complete")
    _, document = await store.wait(request_id, lambda d: d["state"] == "succeeded", 10)
    assert document is not None and document["documents"][0]["reason"] is None
    await wait_for(lambda: k8s.jobs()[0]["metadata"].get("finalizers") == [], message="the finalizer removed")


# ---- 3. a Job gone without its outcome ---------------------------------------------------------


async def test_a_job_gone_while_no_consumer_ran_makes_its_request_unknown(
        nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path)
    async with running_stack(settings) as stack:
        request_id = (await (await stack.publish("hello", "x")).json())["request_id"]
        store = stack.consumers[0].tracker.store
        assert store is not None
        await store.wait(request_id, lambda d: d["state"] == "applied", 10)
    # While no consumer runs, the Job goes (its finalizer removed by hand, as an uninstall would).
    [job] = k8s.jobs()
    async with k8s.api_client() as api:
        from kubernetes_asyncio.client import BatchV1Api

        jobs = BatchV1Api(api)
        await jobs.patch_namespaced_job(job["metadata"]["name"], "default",
                                        [{"op": "remove", "path": "/metadata/finalizers"}])
        await jobs.delete_namespaced_job(job["metadata"]["name"], "default")
    assert not k8s.jobs()
    async with running_stack(settings) as stack:
        store = stack.consumers[0].tracker.store
        assert store is not None
        reached, document = await store.wait(request_id, lambda d: d["state"] == "unknown", 10)
        assert reached and document is not None, document
        assert document["documents"][0]["state"] == "unknown" and "outcome was never recorded" in document["error"]
        status, _ = await stack.get_json(f"/requests/{request_id}")
        assert status == 200


# ---- 5. the stall signal -------------------------------------------------------------------------


async def test_idle_time_does_not_count_as_stalled(nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo,
                                                   tmp_path: Path) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, stall_seconds=1.0, apply_timeout_seconds=0.5)
    async with running_stack(settings) as stack:
        consumer = stack.consumers[0]
        await asyncio.sleep(1.5)  # idle for longer than STALL_SECONDS
        with k8s.emulator.failing(503):  # the API server is down
            loop = asyncio.get_running_loop()
            assert (await stack.publish("hello", "x")).status == 202
            started = loop.time()
            await wait_for(lambda: consumer.queue.get("ack_pending") or consumer.queue.get("pending"),
                           message="work waiting")
            while loop.time() - started < 0.8:
                assert not consumer.stalled, "stalled before work waited STALL_SECONDS"
                await asyncio.sleep(0.05)
            await wait_for(lambda: consumer.stalled, timeout=5, message="the stall signal")
        # The API server is back: the message is applied and the signal clears (the gauge is per process).
        await wait_for(lambda: not consumer.stalled, timeout=15, message="the stall signal to clear")


# ---- 6. a dead message lists what it applied ---------------------------------------------------


async def test_a_dead_message_lists_the_documents_applied_before_the_failure(
        stack: Stack, k8s: EmulatorHandle, repo: GitRepo) -> None:
    config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{{RANDOM}}\ndata: {a: b}\n"
    repo.commit({"config.json": config_json({"pair": ["hello.yaml", "cm.yaml"]}), "cm.yaml": config_map})
    await stack.get_json("/refresh")
    k8s.emulator.fail_next(403, plural="configmaps", reason="Forbidden",
                           message='configmaps "cm" is forbidden: User cannot patch resource')
    request_id = (await (await stack.publish("pair", "x")).json())["request_id"]
    store = stack.consumers[0].tracker.store
    assert store is not None
    # The first document that reads `dead` already lists the Job: not later, not unattributed.
    _, document = await store.wait(request_id, lambda d: d["state"] == "dead", 10)
    assert document is not None
    [job] = document["documents"]
    assert job["kind"] == "Job" and job["state"] == "applied" and job["function_uid"]
    assert "Forbidden" in document["error"]


# ---- 429: the whole consumer slows down --------------------------------------------------------


async def test_a_429_pauses_every_apply_for_retry_after(stack: Stack, k8s: EmulatorHandle) -> None:
    executor: Any = stack.consumers[0].executor
    k8s.emulator.fail_next(429, count=1, retry_after=1, reason="TooManyRequests")
    loop = asyncio.get_running_loop()
    first = (await (await stack.publish("hello", "first")).json())["request_id"]
    await wait_for(lambda: executor._throttle.throttled == 1, message="the 429")
    throttled_at = loop.time()
    others = [(await (await stack.publish("hello", f"m{i}")).json())["request_id"] for i in range(5)]
    await asyncio.sleep(0.5)
    assert loop.time() - throttled_at < 0.9 and not k8s.jobs(), "no apply during Retry-After"
    await wait_for(lambda: len(k8s.jobs()) == 6, message="every Job after the pause")
    assert loop.time() - throttled_at >= 0.9
    store = stack.consumers[0].tracker.store
    assert store is not None
    for request_id in [first, *others]:
        # (the Job exists a moment before its request's status says applied: wait for that write)
        document = await wait_for(lambda rid=request_id: _recorded(store, rid), message=f"{request_id} recorded")
        assert document["attempts"] == 1, "sent again, not redelivered"


async def _recorded(store: Any, request_id: str) -> dict[str, Any] | None:
    document = await store.get(request_id)
    return document if document is not None and document.get("attempts") else None


# ---- 2. validate -------------------------------------------------------------------------------


def test_validate_refuses_what_the_api_server_would(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"topics": [{"name": "t", "configs": ["job.yaml"]}]}))
    (tmp_path / "job.yaml").write_text("""\
apiVersion: batch/v1
kind: Job
metadata:
  name: Upper-{{RANDOM}}
spec:
  template:
    spec:
      restartPolicy: Always
      containers:
        - name: main
          image: busybox
          comand: ["true"]
---
apiVersion: batch/v1
kind: Job
metadata:
  name: a-name-that-is-far-too-long-for-the-job-name-label-of-its-pods-{{RANDOM}}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: main, image: busybox}]
""")
    out = io.StringIO()
    assert validate(Settings(kube_namespace="default"), str(tmp_path), out=out) == 1
    lines = out.getvalue().splitlines()
    assert any(line.startswith("job.yaml:4: ") and "RFC 1123" in line for line in lines), lines
    assert any(line.startswith("job.yaml:8: ") and "restartPolicy must be Never or OnFailure" in line
               for line in lines), lines
    assert any(line.startswith("job.yaml:10: ") and "'comand' was unexpected" in line for line in lines), lines
    assert any(line.startswith("job.yaml:17: ") and "at most 63" in line for line in lines), lines
    assert lines[-1].startswith("4 problem(s)")


def test_the_example_pipeline_validates_against_the_schemas() -> None:
    out = io.StringIO()
    root = Path(__file__).resolve().parent.parent / "examples" / "pipeline"
    assert validate(Settings(kube_namespace="default"), str(root), out=out) == 0, out.getvalue()
    assert "warning" not in out.getvalue()


# ---- DRY_RUN_ON_LOAD -------------------------------------------------------------------------------


async def test_dry_run_on_load_refuses_a_commit_the_api_server_refuses(
        nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, dry_run_on_load=True)
    k8s.emulator.fail_next(422, count=1, reason="Invalid", message='Job.batch "x" is invalid',
                           details={"causes": [{"field": "spec.template.spec.restartPolicy",
                                                "message": 'Unsupported value: "Always"'}]})
    consumer_settings = settings.replace(git_cache_dir=f"{settings.git_cache_dir}-0")
    from consumer.service import Consumer

    consumer = Consumer(consumer_settings)
    await consumer.start()
    try:
        assert consumer.config is None
        assert "the API server refuses it (dry-run)" in str(consumer.repository.error)
        assert 'restartPolicy: Unsupported value: "Always"' in str(consumer.repository.error)
        assert not k8s.jobs(), "a dry-run stores nothing"
        await consumer.refresh()  # the API server now agrees: the same commit loads
        assert consumer.config is not None and not k8s.jobs()
    finally:
        await consumer.stop(grace=1)


@pytest.mark.parametrize("value", ["1", "true", "on"])
def test_dry_run_on_load_is_a_setting(value: str) -> None:
    assert Settings.from_env({"DRY_RUN_ON_LOAD": value}).dry_run_on_load
    assert not Settings.from_env({}).dry_run_on_load
