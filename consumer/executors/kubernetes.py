"""`kubernetes`: server-side apply of every document with the dynamic client (§7, §10).

The dynamic client makes any kind the API server knows (CRDs included) appliable without code
per kind; field manager `gitfaas` with forced conflicts makes re-applying a redelivered message
a no-op rather than an error.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

import aiohttp
from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.dynamic import DynamicClient
from kubernetes_asyncio.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

from consumer.errors import PermanentError, TransientError
from consumer.executors import Applied
from gitfaas.settings import Settings

FIELD_MANAGER = "gitfaas"
TRANSIENT_STATUSES = {408, 409, 429}


async def api_client(settings: Settings) -> ApiClient:
    """In-cluster service account first, else the kubeconfig (`KUBECONFIG` or ~/.kube/config)."""
    try:
        config.load_incluster_config()
        return ApiClient()
    except ConfigException:
        pass
    path = settings.kubeconfig or os.path.expanduser("~/.kube/config")
    return await config.new_client_from_config(config_file=path)


class KubernetesExecutor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._api: ApiClient | None = None
        self._dynamic: DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        self._api = await api_client(self._settings)
        # A discovery cache per process: a shared file keyed by host:port can be stale.
        cache = os.path.join(tempfile.gettempdir(), f"gitfaas-discovery-{os.getpid()}-{id(self)}.json")
        self._dynamic = await DynamicClient(self._api, cache_file=cache)

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        found = self._resources.get(key)
        if found is not None:
            return found
        assert self._dynamic is not None, "executor not started"
        async with self._lock:  # discovery is not safe to run many times at once
            if key not in self._resources:
                try:
                    self._resources[key] = await self._dynamic.resources.get(api_version=api_version, kind=kind)
                except ResourceNotFoundError:
                    raise PermanentError(f"the API server does not know kind {kind} in {api_version}") from None
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    raise TransientError(f"API discovery failed: {type(exc).__name__}: {exc}") from None
        return self._resources[key]

    async def apply(self, document: dict[str, Any]) -> Applied:
        assert self._dynamic is not None, "executor not started"
        api_version, kind = document["apiVersion"], document["kind"]
        resource = await self._resource(api_version, kind)
        metadata = document["metadata"]
        namespace = metadata.get("namespace") if resource.namespaced else None
        if not resource.namespaced:
            metadata.pop("namespace", None)
        try:
            result = await self._dynamic.server_side_apply(
                resource,
                body=document,
                name=metadata["name"],
                namespace=namespace,
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
            )
        except (ApiException, DynamicApiError) as exc:
            raise classify(exc, kind, metadata["name"]) from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientError(f"API server unreachable: {type(exc).__name__}: {exc}") from None
        uid = None
        try:
            uid = result.metadata.uid
        except AttributeError:
            pass
        return Applied(api_version=api_version, kind=kind, namespace=namespace, name=metadata["name"], uid=uid)


def classify(exc: Exception, kind: str, name: str) -> TransientError | PermanentError:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", "") or ""
    message = _api_message(exc) or reason
    text = f"applying {kind} {name} failed: HTTP {status} {message}".strip()
    if status is None or status >= 500 or status in TRANSIENT_STATUSES:
        return TransientError(text)
    return PermanentError(text)


def _api_message(exc: Exception) -> str:
    import json

    body = getattr(exc, "body", None)
    if isinstance(body, bytes | str):
        try:
            data = json.loads(body)
        except ValueError:
            return str(body)[:300]
        if isinstance(data, dict):
            return str(data.get("message", ""))[:300]
    summary = getattr(exc, "summary", None)
    if callable(summary):
        return str(summary())[:300]
    return ""
