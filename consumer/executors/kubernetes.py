"""`kubernetes`: server-side apply of every document with the dynamic client (§7, §10).

The dynamic client makes any kind the API server knows (CRDs included) appliable without code
per kind; field manager `gitfaas` with forced conflicts makes re-applying a redelivered message
a no-op rather than an error.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import tempfile
from typing import Any

import aiohttp
from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient, BatchV1Api
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.dynamic import DynamicClient
from kubernetes_asyncio.dynamic.exceptions import DynamicApiError, ResourceNotFoundError

from consumer import metrics
from consumer.apierrors import ApiStatus, immutable_sentence, warning_texts
from consumer.errors import HandlingError, PermanentError, TransientError
from consumer.executors.base import Applied, JobEvents
from consumer.jobwatch import FINALIZER, JobWatcher
from consumer.prepare import ANNOTATION_REQUEST_ID
from consumer.throttle import MAX_THROTTLED_ATTEMPTS, ApiThrottle, retry_after_seconds
from gitfaas.fast import dumps
from gitfaas.logs import get_logger
from gitfaas.settings import Settings

log = get_logger("gitfaas.consumer")

FIELD_MANAGER = "gitfaas"
APPLY_PATCH_CONTENT_TYPE = "application/apply-patch+yaml; charset=utf-8"
TRANSIENT_STATUSES = {408, 409, 429}
# `group/version` or `version`: a DNS subdomain and a DNS label, as the API server names them.
API_VERSION = re.compile(r"(?:[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?/)?[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?")


PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "https_proxy", "http_proxy", "all_proxy")


async def api_client(settings: Settings) -> ApiClient:
    """In-cluster service account first, else the kubeconfig (`KUBECONFIG` or ~/.kube/config)."""
    try:
        config.load_incluster_config()
        client = ApiClient()
    except ConfigException:
        path = settings.kubeconfig or os.path.expanduser("~/.kube/config")
        client = await config.new_client_from_config(config_file=path)
    _skip_environment_lookups(client)
    return client


def _skip_environment_lookups(client: ApiClient) -> None:
    """kubernetes_asyncio opens its session with `trust_env=True`, so every request looks up proxy
    variables and reads ~/.netrc in a thread: measured at about half the client CPU of an apply
    (bench B2). Without proxy variables there is nothing to find; we turn the lookups off. There
    is no public switch for it, hence the private attribute; with a proxy set, nothing changes."""
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return
    session = getattr(client.rest_client, "pool_manager", None)
    if session is not None and hasattr(session, "_trust_env"):
        session._trust_env = False


class KubernetesExecutor:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._api: ApiClient | None = None
        self._dynamic: DynamicClient | None = None
        self._resources: dict[tuple[str, str], Any] = {}
        self._lock = asyncio.Lock()
        self._watcher: JobWatcher | None = None
        self._cache_dir: str | None = None
        self._throttle: ApiThrottle | None = None
        self._warned: dict[str, None] = {}  # warning texts already logged at WARNING

    async def start(self, events: JobEvents, *, watch_jobs: bool = True) -> None:
        self._events = events
        self._throttle = ApiThrottle(self._settings.max_concurrency)
        self._api = await api_client(self._settings)
        # A discovery cache of this executor's own, in a directory made for it and removed at close:
        # a file shared by host:port can be stale, and one named after pid and id(self) could be read
        # by a later executor that got the same pid and id (in this process once this one is freed,
        # or after a restart that keeps /tmp, an emptyDir in manifests/).
        self._cache_dir = tempfile.mkdtemp(prefix="gitfaas-discovery-")
        try:
            self._dynamic = await DynamicClient(self._api, cache_file=os.path.join(self._cache_dir, "cache.json"))
        except BaseException:
            self._remove_cache()
            raise
        if watch_jobs:
            self._watcher = JobWatcher(self._api, self._settings.namespaces_allowed, events,
                                       request_timeout=self._settings.apply_timeout_seconds)
            self._watcher.start()

    async def job_watch(self) -> JobWatcher | None:
        """The Job watch, once it has listed every namespace (what `consumer.reconcile` needs)."""
        if self._watcher is None:
            return None
        await self._watcher.listed.wait()
        return self._watcher

    async def close(self) -> None:
        if self._watcher is not None:
            await self._watcher.stop()
            self._watcher = None
        if self._api is not None:
            await self._api.close()
            self._api = None
        self._remove_cache()

    def _remove_cache(self) -> None:
        if self._cache_dir is not None:
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            self._cache_dir = None

    async def _resource(self, api_version: str, kind: str) -> Any:
        key = (api_version, kind)
        found = self._resources.get(key)
        if found is not None:
            return found
        assert self._dynamic is not None, "executor not started"
        async with self._lock:  # discovery is not safe to run many times at once
            if key not in self._resources:
                self._resources[key] = await self._discover(api_version, kind)
        return self._resources[key]

    async def _discover(self, api_version: str, kind: str) -> Any:
        """The resource of a kind, or why not: only a definite answer from the API server (its group and
        version do not exist: 404; they exist without the kind) is permanent, any failure is transient."""
        assert self._dynamic is not None
        if not API_VERSION.fullmatch(api_version):
            raise PermanentError(f"apiVersion {api_version[:100]!r} is not valid")
        try:
            # Discovery requests carry no timeout of their own: a hung API server would hold the lock,
            # and with it every message, for ever.
            return await asyncio.wait_for(self._dynamic.resources.get(api_version=api_version, kind=kind),
                                          self._settings.apply_timeout_seconds)
        except ResourceNotFoundError:
            # kubernetes_asyncio reads a failed discovery request (500, 503, a 404 too) as "no resources",
            # so "not found" may only mean the request failed: ask the API server ourselves.
            raise await self._why_unknown(api_version, kind) from None
        except DynamicApiError as exc:
            raise TransientError(f"API discovery of {api_version} failed: HTTP {exc.status}") from None
        except Exception as exc:  # noqa: BLE001 — e.g. an error document where a list was expected
            raise TransientError(f"API discovery failed: {type(exc).__name__}: {str(exc)[:200]}") from None

    async def _why_unknown(self, api_version: str, kind: str) -> HandlingError:
        assert self._dynamic is not None
        path = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        try:
            response = await self._dynamic.request("GET", path, serialize=False,
                                                   _request_timeout=self._settings.apply_timeout_seconds)
            async with response:
                status, payload = response.status, await response.read()
        except (ApiException, DynamicApiError) as exc:
            status, payload = getattr(exc, "status", None), b""
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return TransientError(f"API discovery of {api_version} failed: {type(exc).__name__}: {exc}")
        if status == 404:
            return PermanentError(f"the API server does not serve {api_version} (kind {kind})")
        body = _json(payload) if status == 200 else None
        if not isinstance(body, dict) or not isinstance(body.get("resources"), list):
            return TransientError(f"API discovery of {api_version} failed: HTTP {status}")
        if any(isinstance(r, dict) and r.get("kind") == kind for r in body["resources"]):
            return TransientError(f"API discovery of {api_version} was incomplete (kind {kind} is served)")
        return PermanentError(f"the API server does not know kind {kind} in {api_version}")

    async def apply(self, document: dict[str, Any], *, dry_run: bool = False) -> Applied:
        """Server-side apply of one document (`dry_run`: the API server checks it and stores nothing).

        A `batch/v1` Job gets gitfaas's finalizer, so it stays until its outcome is recorded
        (`consumer.jobwatch`). Throttled (429) applies wait with every other apply of this executor
        (`consumer.throttle`) and are sent again.
        """
        assert self._dynamic is not None and self._throttle is not None, "executor not started"
        api_version, kind = document["apiVersion"], document["kind"]
        resource = await self._resource(api_version, kind)
        metadata = document["metadata"]
        namespace = metadata.get("namespace") if resource.namespaced else None
        if not resource.namespaced:
            metadata.pop("namespace", None)
        name = metadata["name"]
        is_job = kind == "Job" and api_version == "batch/v1"
        if is_job and FINALIZER not in (metadata.get("finalizers") or []):
            metadata["finalizers"] = [*(metadata.get("finalizers") or []), FINALIZER]
        if is_job and not dry_run and isinstance(document.get("spec"), dict) and document["spec"].get("suspend"):
            # A suspended Job's template labels may change, so the API server would not stop a takeover.
            await self._refuse_another_requests_job(namespace, name, document)
        for attempt in range(1, MAX_THROTTLED_ATTEMPTS + 1):
            async with self._throttle.slot():
                status, payload, headers = await self._send_apply(resource, document, name, namespace, dry_run)
            if status == 429 and attempt < MAX_THROTTLED_ATTEMPTS:
                seconds = retry_after_seconds(next(iter(_header_values(headers, "Retry-After")), None))
                log.warning("API server throttling applies (429): every apply waits", retry_after_s=seconds,
                            kind=kind, name=name, apply_limit=int(self._throttle.limit / 2) or 1)
                self._throttle.throttled_for(seconds)
                continue
            break
        if not 200 <= status <= 299:
            raise await self._refusal(status, payload, kind, name, namespace, document)
        self._throttle.succeeded()
        warnings = tuple(warning_texts(_header_values(headers, "Warning")))
        if warnings:
            metrics.API_WARNINGS.inc(len(warnings))
            self._log_warnings(kind, name, warnings, dry_run)
        # The applied object is not parsed: nothing reads it, and decoding it was ~4% of the
        # consumer's CPU (bench B2).
        return Applied(api_version=api_version, kind=kind, namespace=namespace, name=name, warnings=warnings)

    async def _send_apply(self, resource: Any, document: dict[str, Any], name: str, namespace: str | None,
                          dry_run: bool) -> tuple[int, bytes, Any]:
        assert self._dynamic is not None
        try:
            # serialize=False gives the raw response: kubernetes_asyncio 36's dynamic client reads
            # responses with _preload_content=False, which skips its own status check, so an error
            # answer (422, 500, ...) would otherwise look like success. We check the status here.
            #
            # The server-side apply is sent through `request` rather than `server_side_apply`, with the
            # body already JSON (orjson): the latter walks the whole document again
            # (sanitize_for_serialization) and json.dumps it, ~15% of the consumer's CPU per message in
            # B2. JSON is valid apply-patch YAML; the `charset` parameter makes kubernetes_asyncio's REST
            # layer send the bytes as they are (it JSON-encodes any body under the bare media type), and
            # the API server reads the media type without its parameters.
            response = await self._dynamic.request(
                "patch",
                resource.path(name=name, namespace=namespace),
                body=dumps(document),
                content_type=APPLY_PATCH_CONTENT_TYPE,
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
                serialize=False,
                _request_timeout=self._settings.apply_timeout_seconds,
                **({"dry_run": "All"} if dry_run else {}),
            )
            async with response:
                return response.status, await response.read(), response.headers
        except (ApiException, DynamicApiError) as exc:
            return getattr(exc, "status", None) or 0, _exception_body(exc), _exception_headers(exc)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise TransientError(f"API server unreachable: {type(exc).__name__}: {exc}") from None

    async def _refusal(self, status: int, payload: bytes, kind: str, name: str, namespace: str | None,
                       document: dict[str, Any]) -> HandlingError:
        refused = ApiStatus.parse(status or None, payload)
        if kind == "Job" and refused.immutable_template:
            found, owner = await self._owner_of(namespace, name)
            if found is not False:  # it exists (or cannot be read): the template is what differs
                return PermanentError(f"{immutable_sentence(kind, name, owner)} (the API server answered "
                                      f"HTTP {status}: spec.template: field is immutable)")
        return classify(status or None, refused.text(), kind, name)

    async def _owner_of(self, namespace: str | None, name: str) -> tuple[bool | None, str | None]:
        """(whether a Job of that name exists — None: cannot tell, the request it was applied for)."""
        assert self._api is not None
        if namespace is None:
            return None, None
        try:
            response = await BatchV1Api(self._api).read_namespaced_job(
                name, namespace, _preload_content=False, _request_timeout=self._settings.apply_timeout_seconds)
            async with response:
                if response.status == 404:
                    return False, None
                if response.status != 200:
                    return None, None
                job = _json(await response.read())
        except Exception:  # noqa: BLE001 — the sentence is only less precise without it
            return None, None
        annotations = ((job or {}).get("metadata") or {}).get("annotations") or {}
        return True, annotations.get(ANNOTATION_REQUEST_ID)

    async def _refuse_another_requests_job(self, namespace: str | None, name: str, document: dict[str, Any]) -> None:
        _found, owner = await self._owner_of(namespace, name)
        ours = (document["metadata"].get("annotations") or {}).get(ANNOTATION_REQUEST_ID)
        if owner is not None and owner != ours:
            raise PermanentError(f"Job {name} already exists and belongs to request {owner}; gitfaas never applies "
                                 "over another request's Job — give the name a per-request part such as {{RANDOM}}")

    def _log_warnings(self, kind: str, name: str, warnings: tuple[str, ...], dry_run: bool) -> None:
        """Each warning is logged at WARNING the first time it is seen, then at DEBUG (a Pod Security
        warning comes back on every apply of the same manifest); every one is stored in the status."""
        for text in warnings:
            first = text not in self._warned
            if first:
                self._warned[text] = None
                if len(self._warned) > 1000:
                    del self._warned[next(iter(self._warned))]
            (log.warning if first else log.debug)("API server warning on apply", kind=kind, name=name, warning=text,
                                                  dry_run=dry_run or None)


def classify(status: int | None, message: str, kind: str, name: str) -> TransientError | PermanentError:
    text = f"applying {kind} {name} failed: {message}".strip()
    if status is None or status >= 500 or status in TRANSIENT_STATUSES:
        return TransientError(text)
    return PermanentError(text)


def _json(payload: bytes) -> Any:
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _exception_body(exc: Exception) -> bytes:
    body = getattr(exc, "body", None)
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return str(getattr(exc, "reason", "") or "").encode()


def _exception_headers(exc: Exception) -> Any:
    return getattr(exc, "headers", None) or {}


def _header_values(headers: Any, name: str) -> list[str]:
    """Every value of a header (`Warning` may come several times)."""
    if headers is None:
        return []
    if hasattr(headers, "getall"):
        return [str(v) for v in headers.getall(name, [])]
    value = headers.get(name)
    return [str(value)] if value is not None else []
