"""
The emulator must look like a real API server to kubernetes_asyncio's dynamic client.

Everything goes over real HTTP via a client built from the handle's kubeconfig, because that is how
production code will talk to it: a test passing here means the client's own parsing accepts our answers.
"""
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest
from kubernetes_asyncio import config, watch
from kubernetes_asyncio.client import ApiClient, BatchV1Api
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.dynamic import DynamicClient
from kubernetes_asyncio.dynamic.resource import Resource

from tests.emulator import EmulatorHandle, running_emulator

MANAGER = "gitfaas-test"


@pytest.fixture
async def k8s(tmp_path: Path) -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(tmp_path) as handle:
        yield handle


@pytest.fixture
async def dyn(k8s: EmulatorHandle) -> AsyncIterator[DynamicClient]:
    # As production code does it: a kubeconfig file → ApiClient → DynamicClient (with a private cache).
    api: ApiClient = await config.new_client_from_config(config_file=str(k8s.kubeconfig))
    async with api:
        yield await DynamicClient(api, cache_file=str(k8s.discovery_cache))


@pytest.fixture
async def jobs(dyn: DynamicClient) -> Resource:
    return await dyn.resources.get(api_version="batch/v1", kind="Job")


def job(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "labels": labels},
            "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}


async def apply(dyn: DynamicClient, res: Resource, body: dict[str, Any], namespace: str = "default") -> Any:
    return await dyn.server_side_apply(res, body=body, namespace=namespace, field_manager=MANAGER)


async def outcome(call: Awaitable[Any]) -> tuple[int, dict[str, Any]]:
    """
    The HTTP status & body of a dynamic-client call, however the client reports an error.

    kubernetes_asyncio 36.1.0's DynamicClient requests with ``_preload_content=False`` and its REST client
    checks the status only when preloading, so errors do NOT raise: the ``Status`` comes back as a
    ResourceInstance (tomplus/kubernetes_asyncio PR #402 addresses it; the installed 36.1.0 lacks the fix).
    Production code must check ``result.kind == "Status"`` itself; this helper accepts either behaviour.
    """
    try:
        result = (await call).to_dict()
    except ApiException as e:
        return e.status, json.loads(e.body)
    return (result["code"] if result.get("kind") == "Status" else 200), result


async def test_discovery_knows_builtin_kinds(jobs: Resource, dyn: DynamicClient) -> None:
    assert (jobs.kind, jobs.name, jobs.namespaced) == ("Job", "jobs", True)
    configmaps = await dyn.resources.get(api_version="v1", kind="ConfigMap")
    assert (configmaps.name, configmaps.namespaced) == ("configmaps", True)


@pytest.mark.parametrize("namespace", ["default", "other"])
async def test_ssa_creates_absent_object(k8s: EmulatorHandle, dyn: DynamicClient, jobs: Resource,
                                         namespace: str) -> None:
    result = await apply(dyn, jobs, job("j1", app="a"), namespace=namespace)
    meta = result.to_dict()["metadata"]
    assert meta["name"] == "j1" and meta["namespace"] == namespace and meta["labels"] == {"app": "a"}
    assert meta["uid"] and meta["creationTimestamp"] and meta["resourceVersion"]
    assert [j["metadata"]["uid"] for j in k8s.jobs(namespace)] == [meta["uid"]]
    assert k8s.jobs("elsewhere") == []


async def test_ssa_again_updates_in_place(k8s: EmulatorHandle, dyn: DynamicClient, jobs: Resource) -> None:
    first = (await apply(dyn, jobs, job("j1", app="a", old="x"))).to_dict()["metadata"]
    second = (await apply(dyn, jobs, job("j1", app="b"))).to_dict()["metadata"]
    assert second["labels"] == {"app": "b"}  # the applier's intent replaces its previous one
    assert second["uid"] == first["uid"] and second["creationTimestamp"] == first["creationTimestamp"]
    assert int(second["resourceVersion"]) > int(first["resourceVersion"])
    third = (await apply(dyn, jobs, job("j1", app="b"))).to_dict()["metadata"]
    assert third["resourceVersion"] == second["resourceVersion"]  # a no-op apply changes nothing
    assert [j["metadata"]["labels"] for j in k8s.jobs()] == [{"app": "b"}]


async def test_ssa_without_field_manager_is_rejected_as_by_a_real_server(
        k8s: EmulatorHandle, dyn: DynamicClient, jobs: Resource) -> None:
    status, body = await outcome(dyn.server_side_apply(jobs, body=job("j1"), namespace="default"))
    assert status == 422 and body["reason"] == "Invalid" and k8s.jobs() == []


async def test_list_is_typed_and_filtered(k8s: EmulatorHandle, dyn: DynamicClient, jobs: Resource) -> None:
    await apply(dyn, jobs, job("a1", app="a", tier="x"))
    await apply(dyn, jobs, job("a2", app="a"))
    await apply(dyn, jobs, job("b1", app="b", tier="y"))
    await apply(dyn, jobs, job("a3", app="a"), namespace="other")

    listed = await dyn.get(jobs, namespace="default")
    assert listed.kind == "JobList" and listed.apiVersion == "batch/v1"
    assert sorted(item["metadata"]["name"] for item in listed.to_dict()["items"]) == ["a1", "a2", "b1"]
    assert len((await dyn.get(jobs)).to_dict()["items"]) == 4  # cluster-wide

    async def names(selector: str) -> list[str]:
        result = await dyn.get(jobs, namespace="default", label_selector=selector)
        return sorted(item["metadata"]["name"] for item in result.to_dict()["items"])

    assert await names("app=a") == ["a1", "a2"]
    assert await names("app==a") == ["a1", "a2"]
    assert await names("app!=a") == ["b1"]
    assert await names("tier") == ["a1", "b1"]
    assert await names("!tier") == ["a2"]
    assert await names("app=a,tier") == ["a1"]
    assert await names("app in (a, b),tier notin (y)") == ["a1", "a2"]
    assert await names("app=zzz") == []
    status, _ = await outcome(dyn.get(jobs, namespace="default", label_selector="app=a=b"))
    assert status == 400


async def test_watch_honours_label_selector(k8s: EmulatorHandle, dyn: DynamicClient, jobs: Resource) -> None:
    await apply(dyn, jobs, job("a1", app="a"))
    await apply(dyn, jobs, job("b1", app="b"))
    events: list[tuple[str, str]] = []
    async with asyncio.timeout(10), watch.Watch() as watcher:
        stream = dyn.watch(jobs, namespace="default", label_selector="app=a", watcher=watcher)
        async with contextlib.aclosing(stream):
            async for event in stream:
                events.append((event["type"], event["object"].metadata.name))
                if len(events) == 1:  # the initial replay proves the watch is subscribed
                    await apply(dyn, jobs, job("b2", app="b"))  # would arrive before a2 if unfiltered
                    await apply(dyn, jobs, job("a2", app="a"))
                elif len(events) == 2:
                    await k8s.set_job_status("a1")  # as the Job controller would
                elif len(events) == 3:
                    conditions = event["raw_object"]["status"]["conditions"]
                    assert {"type": "Complete", "status": "True"}.items() <= conditions[-1].items()
                    await apply(dyn, jobs, job("a2", app="b"))  # leaves the selection
                else:
                    break
    assert events == [("ADDED", "a1"), ("ADDED", "a2"), ("MODIFIED", "a1"), ("DELETED", "a2")]


async def test_configmap_ssa(k8s: EmulatorHandle) -> None:
    async with k8s.dynamic_client() as dyn:  # the handle's own shortcut, for other tests
        configmaps = await dyn.resources.get(api_version="v1", kind="ConfigMap")
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"k": "v1"}}
        await apply(dyn, configmaps, body)
        await apply(dyn, configmaps, dict(body, data={"k": "v2"}))
        fetched = await dyn.get(configmaps, name="cm", namespace="default")
    assert fetched.data.k == "v2"
    assert [cm["data"] for cm in k8s.objects("v1", "configmaps", "default")] == [{"k": "v2"}]


@pytest.mark.parametrize(("status", "reason"), [(500, "InternalError"), (429, "TooManyRequests"),
                                                (422, "Invalid")])
async def test_fault_injection_for_the_next_requests(k8s: EmulatorHandle, dyn: DynamicClient, jobs: Resource,
                                                     status: int, reason: str) -> None:
    fault = k8s.emulator.fail_next(status, count=2, message="boom", plural="jobs")
    got_status, got_body = await outcome(apply(dyn, jobs, job("j1")))
    assert got_status == status
    assert got_body.items() >= {"kind": "Status", "code": status, "reason": reason, "message": "boom"}.items()
    with pytest.raises(ApiException) as err:  # the generated (typed) API raises as documented
        await BatchV1Api(dyn.client).patch_namespaced_job(
            "j1", "default", job("j1"), field_manager=MANAGER, _content_type="application/apply-patch+yaml")
    assert err.value.status == status and json.loads(err.value.body)["reason"] == reason
    assert fault.hits == 2 and k8s.emulator.faults == [] and k8s.jobs() == []
    await apply(dyn, jobs, job("j1"))  # the faults are used up
    assert len(k8s.jobs()) == 1


async def test_fault_injection_while_flagged(k8s: EmulatorHandle, dyn: DynamicClient, jobs: Resource) -> None:
    batch = BatchV1Api(dyn.client)
    with k8s.emulator.failing(503, retry_after=1) as fault:
        for _ in range(3):
            with pytest.raises(ApiException) as err:
                await batch.patch_namespaced_job("j1", "default", job("j1"), field_manager=MANAGER,
                                                 _content_type="application/apply-patch+yaml")
            assert err.value.status == 503 and err.value.headers["Retry-After"] == "1"
        assert (await batch.list_namespaced_job("default")).items == []  # other methods are unaffected
    assert fault.hits == 3 and k8s.emulator.faults == []
    await apply(dyn, jobs, job("j1"))
    assert len(k8s.jobs()) == 1
