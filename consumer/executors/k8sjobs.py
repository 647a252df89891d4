"""What the consumer does with a Kubernetes Job after applying it (§11): delete it when its run is
cancelled, and read its output (the logs of its pods).

A client of its own (`api_client`, as the executor builds it), opened on first use, so the executor
and its Job watch are left as they are. Calls and the permissions they need (manifests/base/rbac.yaml,
checked by tests/test_deploy.py):

  BatchV1Api.delete_namespaced_job (propagationPolicy Background: the pods go too)   jobs: delete
  CoreV1Api.list_namespaced_pod (labelSelector job-name=<Job>)                        pods: list
  CoreV1Api.read_namespaced_pod_log                                                   pods/log: get
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from kubernetes_asyncio.client import ApiClient, BatchV1Api, CoreV1Api
from kubernetes_asyncio.client.exceptions import ApiException

from consumer.executors.kubernetes import api_client
from gitfaas.settings import Settings

MAX_LOG_BYTES = 512 * 1024  # per container: the newest output when there is more


class KubernetesJobs:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._api: ApiClient | None = None
        self._lock = asyncio.Lock()

    async def _client(self) -> ApiClient:
        async with self._lock:
            if self._api is None:
                self._api = await api_client(self._settings)
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    def _namespace(self, namespace: str | None) -> str:
        return namespace or self._settings.kube_namespace

    async def cancel_job(self, namespace: str | None, name: str) -> bool:
        """Delete the Job and (background propagation) its pods; True when it is gone."""
        batch = BatchV1Api(await self._client())
        try:
            await batch.delete_namespaced_job(name, self._namespace(namespace), propagation_policy="Background",
                                              _request_timeout=self._settings.apply_timeout_seconds)
        except ApiException as exc:
            if exc.status == 404:
                return True  # deleted already (by another consumer, or its TTL)
            raise
        return True

    async def _pods(self, namespace: str, name: str) -> list[dict[str, Any]]:
        core = CoreV1Api(await self._client())
        response = await core.list_namespaced_pod(namespace, label_selector=f"job-name={name}",
                                                  _preload_content=False,
                                                  _request_timeout=self._settings.apply_timeout_seconds)
        async with response:
            if not 200 <= response.status <= 299:
                raise ApiException(status=response.status, reason=(await response.text())[:300])
            listing = json.loads(await response.read())
        pods = [pod for pod in listing.get("items") or [] if isinstance(pod, dict)]
        return sorted(pods, key=lambda pod: (pod.get("metadata") or {}).get("creationTimestamp") or "")

    async def _log(self, namespace: str, pod: str, container: str, tail: int | None = None) -> list[str]:
        core = CoreV1Api(await self._client())
        options: dict[str, Any] = {"container": container, "limit_bytes": MAX_LOG_BYTES}
        if tail is not None:
            options["tail_lines"] = tail
        try:
            response = await core.read_namespaced_pod_log(pod, namespace, _preload_content=False,
                                                          _request_timeout=self._settings.apply_timeout_seconds,
                                                          **options)
        except ApiException as exc:
            if exc.status in (400, 404):  # container not started yet, or pod gone
                return []
            raise
        async with response:
            if response.status in (400, 404):
                return []
            if not 200 <= response.status <= 299:
                raise ApiException(status=response.status, reason=(await response.text())[:300])
            text = (await response.read()).decode(errors="replace")
        return text.splitlines()

    async def _output(self, namespace: str | None, name: str, tail: int | None = None) -> list[tuple[str, str]]:
        """(prefix, line) of every container of every pod of the Job, oldest pod first."""
        namespace = self._namespace(namespace)
        pods = await self._pods(namespace, name)
        out: list[tuple[str, str]] = []
        for pod in pods:
            pod_name = (pod.get("metadata") or {}).get("name") or ""
            spec = pod.get("spec") or {}
            containers = [c.get("name") for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
                          if isinstance(c, dict) and c.get("name")]
            for container in containers:
                prefix = name if len(containers) == 1 else f"{name}/{container}"
                out.extend((prefix, line) for line in await self._log(namespace, pod_name, container, tail))
        return out

    async def logs(self, namespace: str | None, name: str, after: int = 0) -> tuple[list[str], int]:
        lines = [f"[{prefix}] {line}" for prefix, line in await self._output(namespace, name)]
        return lines[after:], len(lines)

    async def tail(self, namespace: str | None, name: str, count: int = 5) -> list[str]:
        return [line for _prefix, line in await self._output(namespace, name, tail=count)][-count:]
