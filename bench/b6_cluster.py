"""B6 (issue 14, opt-in): 1,000 Jobs through the bridge vs a bare server-side-apply loop, both against
the same real API server.

Runs when `GITFAAS_TEST_KUBECONFIG` (the consumer's ServiceAccount with the Role of manifests/base)
and `GITFAAS_TEST_ADMIN_KUBECONFIG` (to clean up) are set, as `make test-k8s`; otherwise it reports
that it was skipped and how to get a cluster. Namespace: `GITFAAS_TEST_NAMESPACE` (default gitfaas).

- baseline: kubernetes_asyncio's dynamic client server-side-applies the same rendered Jobs (field
  manager gitfaas, force), 32 at a time, from the bench process, with the consumer's kubeconfig;
- gitfaas: a bridge process and a consumer process (EXECUTOR=kubernetes, MAX_CONCURRENCY=32);
  the bench POSTs 1,000 messages to /publish (64 in flight) and times from the first POST to the
  consumer's 1,000th applied message (its /metrics). The consumer also writes status, follows the
  Jobs with its watches and releases their finalizers, as in production.

Between the sides every Job of the run is deleted (finalizers removed first) by the admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from bench.common import (
    PYTHON,
    TOPIC,
    Child,
    CpuMeter,
    Service,
    Table,
    body,
    children,
    consumer_counts,
    make_repo,
    nats_pid,
    nats_server,
    pct,
    service_env,
    start_bridge,
    timed_apply_loop,
)
from consumer.configuration import load_configuration
from consumer.documents import Request, render_request
from gitfaas.embedded import free_port
from gitfaas.settings import Settings

CONCURRENCY = 32
IN_FLIGHT = 64
KUBECONFIG = os.environ.get("GITFAAS_TEST_KUBECONFIG", "")
ADMIN_KUBECONFIG = os.environ.get("GITFAAS_TEST_ADMIN_KUBECONFIG", "")
NAMESPACE = os.environ.get("GITFAAS_TEST_NAMESPACE", "gitfaas")


async def client(path: str) -> k8s_client.ApiClient:
    configuration = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=path, client_configuration=configuration)
    return k8s_client.ApiClient(configuration)


async def apply_loop(documents: list[dict[str, Any]], work: Path) -> float:
    return await timed_apply_loop(KUBECONFIG, documents, work, namespace=NAMESPACE, concurrency=CONCURRENCY,
                                  request_timeout=30)


async def clean_up(label: str) -> int:
    """Delete the run's Jobs: finalizers removed first (what the README's uninstall step does)."""
    async with await client(ADMIN_KUBECONFIG) as api:
        batch = k8s_client.BatchV1Api(api)
        listing = await batch.list_namespaced_job(NAMESPACE, label_selector=label)
        names = [job.metadata.name for job in listing.items if job.metadata.finalizers]
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def release(name: str) -> None:
            async with semaphore:
                with contextlib.suppress(Exception):
                    await batch.patch_namespaced_job(name, NAMESPACE, {"metadata": {"finalizers": None}},
                                                     _content_type="application/merge-patch+json")

        await asyncio.gather(*(release(name) for name in names))
        await batch.delete_collection_namespaced_job(NAMESPACE, label_selector=label, propagation_policy="Background")
        return len(listing.items)


def start_consumer(work: Path, nats_url: str, repo: Path, bridge_url: str) -> Service:
    port = free_port()
    child = Child("consumer", [PYTHON, "-m", "cli", "consumer"], work / "consumer.log", service_env(
        nats_url, GIT_URL=str(repo), GIT_CACHE_DIR=str(work / "consumer-git-cache"), GIT_POLL_SECONDS="0",
        EXECUTOR="kubernetes", KUBECONFIG=KUBECONFIG, KUBE_NAMESPACE=NAMESPACE, CONSUMER_HOST="127.0.0.1",
        CONSUMER_HTTP_PORT=str(port), BRIDGE_URL=bridge_url, MAX_CONCURRENCY=str(CONCURRENCY)))
    child.start()
    return Service(child, f"http://127.0.0.1:{port}")


async def run(smoke: bool = False, profile: bool = False, work: Path | None = None) -> Table:
    assert work is not None
    count = 50 if smoke else 1000
    table = Table("B6", f"{count:,} Jobs through the bridge vs a bare server-side-apply loop, same real API server",
                  ["side", "concurrency", "Jobs", "seconds", "Jobs per second", "CPU (share of one core)"],
                  smoke=smoke)
    if not (KUBECONFIG and ADMIN_KUBECONFIG):
        table.notes = ["skipped: set GITFAAS_TEST_KUBECONFIG (the gitfaas-consumer ServiceAccount with the Role of "
                       "manifests/base) and GITFAAS_TEST_ADMIN_KUBECONFIG; any test cluster does (kind, k3d, "
                       "minikube; see tests/k8s/conftest.py)"]
        table.numbers = {"skipped": 1}
        return table
    repo = make_repo(work / "repo")
    settings = Settings(git_url=str(repo), kube_namespace=NAMESPACE, bridge_url="http://127.0.0.1:5000")
    config = load_configuration(repo, "b" * 40, settings)
    documents = [render_request(settings, config, Request(
        topic=TOPIC, request_id=(rid := str(uuid.uuid4())), identity=f"{rid}|{i + 1}|b6", stream_seq=i + 1,
        body=body(i), params={}))[0] for i in range(count)]
    label = f"gitfaas.io/topic={TOPIC}"
    await clean_up(label)

    meter = CpuMeter({"bench (kubernetes_asyncio)": os.getpid()})
    meter.start()
    base_seconds = await apply_loop(documents, work)
    meter.stop()
    base_cpu = meter.text()
    base_jobs = await clean_up(label)

    async with nats_server(work) as server, aiohttp.ClientSession() as http:
        bridge = start_bridge(work, server.url)
        consumer = start_consumer(work, server.url, repo, bridge.url)
        async with children(bridge.child, consumer.child):
            await consumer.ready(http, 60)
            await bridge.ready(http, 60)
            meter = CpuMeter({"bridge": bridge.child.pid, "consumer": consumer.child.pid,
                              "nats-server": nats_pid(server)})
            semaphore = asyncio.Semaphore(IN_FLIGHT)

            async def post(index: int) -> None:
                async with semaphore, http.post(f"{bridge.url}/publish/{TOPIC}", data=body(index),
                                                headers={"Content-Type": "application/json"}) as answer:
                    if answer.status != 202:
                        raise RuntimeError(f"the bridge answered {answer.status}: {await answer.text()}")

            started = time.perf_counter()
            meter.start()
            await asyncio.gather(*(post(i) for i in range(count)))
            deadline = time.monotonic() + 120 + count / 5
            while (applied := (await consumer_counts(http, consumer))["applied"]) < count:
                consumer.child.check_alive()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the consumer applied {applied} of {count} ({consumer.child.log_path})")
                await asyncio.sleep(0.05)
            seconds = time.perf_counter() - started
            meter.stop()
            gitfaas_cpu = meter.text()
    gitfaas_jobs = await clean_up(label)

    base_rate, rate = count / base_seconds, count / seconds
    ratio = rate / base_rate
    table.rows = [
        ["baseline: bare kubernetes_asyncio server-side apply loop", CONCURRENCY, base_jobs, base_seconds, base_rate,
         base_cpu],
        ["gitfaas: POST /publish → bridge → JetStream → consumer → apply", f"{IN_FLIGHT} POSTs in flight, "
         f"MAX_CONCURRENCY={CONCURRENCY}", gitfaas_jobs, seconds, rate, gitfaas_cpu],
        ["ratio gitfaas / baseline", "", "", "", pct(ratio), ""],
    ]
    table.notes = [
        f"the same real API server (namespace {NAMESPACE}, RBAC on, the consumer's ServiceAccount on both sides); "
        "both sides apply the same rendered Job; gitfaas's Jobs also carry its finalizer, which the consumer "
        "removes as they finish",
        "gitfaas time: from the first POST to the consumer's last applied message (its /metrics, polled every "
        "50 ms): bridge, JetStream, status writes and the Job watches included",
        "API server, etcd and controllers are not in the CPU column (they are not children of the bench)",
    ]
    table.numbers = {"ratio": ratio, "gitfaas_rate": rate, "baseline_rate": base_rate}
    return table
