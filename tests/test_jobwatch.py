"""Job tracking survives watch restarts, 410 Gone and API errors, without polling each Job."""

from __future__ import annotations

import pytest
from kubernetes_asyncio import config

from consumer import jobwatch
from consumer.executors.base import JobEvent
from consumer.jobwatch import JobWatcher, job_state
from tests.conftest import wait_for
from tests.emulator import EmulatorHandle, job_status


class Recorder:
    def __init__(self) -> None:
        self.events: list[JobEvent] = []

    async def job_changed(self, event: JobEvent) -> None:
        self.events.append(event)

    def states(self, name: str) -> list[str]:
        return [e.state for e in self.events if e.name == name]


def job(name: str, request_id: str = "r-1") -> dict:
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"app.kubernetes.io/managed-by": "gitfaas"},
                         "annotations": {"gitfaas.io/request-id": request_id, "gitfaas.io/topic": "t"}},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}}


async def apply(k8s: EmulatorHandle, body: dict) -> None:
    async with k8s.dynamic_client() as dyn:
        jobs = await dyn.resources.get(api_version="batch/v1", kind="Job")
        await dyn.server_side_apply(jobs, body=body, namespace="default", field_manager="test")


@pytest.fixture
async def watcher(k8s: EmulatorHandle, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(jobwatch, "WATCH_SECONDS", 1)  # the server ends each watch after a second
    monkeypatch.setattr(jobwatch, "RETRY_SECONDS", 0.1)
    api = await config.new_client_from_config(config_file=str(k8s.kubeconfig))
    recorder = Recorder()
    follower = JobWatcher(api, frozenset({"default"}), recorder)
    yield follower, recorder
    await follower.stop()
    await api.close()


async def test_outcomes_are_reported_across_watch_restarts(watcher, k8s: EmulatorHandle) -> None:
    follower, recorder = watcher
    await apply(k8s, job("before"))
    await k8s.set_job_status("before", condition="Complete")
    follower.start()
    await wait_for(lambda: recorder.states("before") == ["succeeded"], message="a Job finished before the start")
    await apply(k8s, job("after"))
    await k8s.set_job_status("after", condition=None, active=1)
    await wait_for(lambda: recorder.states("after") == ["running"], message="running")
    # Outlive a few server-side watch ends (1 s each) before the outcome arrives.
    def watches() -> int:
        return len([r for r in k8s.emulator._requests if r.params.get("watch")])

    first = watches()
    await wait_for(lambda: watches() >= first + 2, timeout=10, message="the watch to be resumed twice")
    await k8s.set_job_status("after", condition="Failed", reason="DeadlineExceeded", message="too slow")
    await wait_for(lambda: recorder.states("after") == ["running", "failed"], message="failed after resumes")
    [failed] = [e for e in recorder.events if e.name == "after" and e.state == "failed"]
    assert failed.reason == "DeadlineExceeded: too slow" and failed.request_id == "r-1" and failed.topic == "t"


async def test_gone_and_errors_lead_to_a_fresh_list(watcher, k8s: EmulatorHandle) -> None:
    follower, recorder = watcher
    k8s.emulator.fail_next(410, count=1, method="GET", plural="jobs")
    k8s.emulator.fail_next(500, count=2, method="GET", plural="jobs")
    follower.start()
    await apply(k8s, job("x"))
    await k8s.set_job_status("x", condition="Complete")
    await wait_for(lambda: recorder.states("x") == ["succeeded"], timeout=15, message="succeeded after the faults")
    assert not k8s.emulator.faults


async def test_a_deleted_unfinished_job_counts_as_failed(watcher, k8s: EmulatorHandle) -> None:
    follower, recorder = watcher
    follower.start()
    await apply(k8s, job("doomed"))
    await k8s.set_job_status("doomed", condition=None, active=1)
    await wait_for(lambda: recorder.states("doomed") == ["running"], message="running")
    async with k8s.dynamic_client() as dyn:
        jobs = await dyn.resources.get(api_version="batch/v1", kind="Job")
        await dyn.delete(jobs, name="doomed", namespace="default")
    await wait_for(lambda: recorder.states("doomed") == ["running", "failed"], message="failed on deletion")


@pytest.mark.parametrize(("condition", "expected"), [
    ("Complete", "succeeded"), ("Failed", "failed"), (None, "running"),
])
def test_job_state_reads_conditions(condition: str | None, expected: str) -> None:
    assert job_state({"status": job_status(condition)})[0] == expected
    assert job_state({"status": {}}) == ("applied", None)


WATCH_LINES = [
    '{"type": "ADDED", "object": {"kind": "Job", "metadata": {"name": "a", "resourceVersion": "17"}, '
    '"status": {"active": 1}}}',
    '{"type": "MODIFIED", "object": {"metadata": {"name": "a", "resourceVersion": "18", '
    '"labels": {"x": "\\u00e9\\ud83d\\ude00"}}, "spec": {"n": 9223372036854775807, "f": 0.1}}}',
    '{"type": "DELETED", "object": {"metadata": {"name": "a"}}}',
    '{"type": "BOOKMARK", "object": {"kind": "Job", "metadata": {"resourceVersion": "30"}}}',
    '{"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired", "message": "too old"}}',
    '{"kind": "Status", "code": 500, "reason": "InternalError", "message": "boom"}',
    '{"type": "ADDED"}',
    'not json at all',
    '{"type": "ADDED", "object": {"metadata": {"name": "nan", "resourceVersion": "19"}, "v": NaN}}',
]


@pytest.mark.parametrize("line", WATCH_LINES)
async def test_watch_events_read_as_kubernetes_asyncio_reads_them(line: str) -> None:
    """The watch reads its usual events with orjson: the same event, resourceVersion and errors as the library's.

    (Not the same: an integer beyond 64 bits, which orjson reads as a float. The API server sends none in a
    Job or an Event: their numbers are int32 and int64 fields.)"""
    ours, theirs = jobwatch._RawWatch(), jobwatch.Watch()
    outcomes = []
    try:
        for watch in (ours, theirs):
            try:
                outcomes.append(("event", watch.unmarshal_event(line, None), watch.resource_version))
            except Exception as exc:  # noqa: BLE001 — compared below
                outcomes.append(("error", type(exc), str(exc), watch.resource_version))
    finally:
        for watch in (ours, theirs):
            await watch._api_client.close()
    assert repr(outcomes[0]) == repr(outcomes[1])
