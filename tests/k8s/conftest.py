"""The opt-in suite against a real Kubernetes API server (`make test-k8s`, issue 14).

It runs when two kubeconfigs are given:

- `GITFAAS_TEST_KUBECONFIG`: what gitfaas runs as — the consumer's ServiceAccount bound to exactly
  the Role of `manifests/base` (`kubectl apply -k` the Namespace, ServiceAccounts, Role and
  RoleBinding of `manifests/base`, then make a token: `kubectl -n gitfaas create token gitfaas-consumer`);
- `GITFAAS_TEST_ADMIN_KUBECONFIG`: an administrator, to look at results and set up what the
  tests need (Pod Security labels, flow control), never to do gitfaas's work;

and optionally `GITFAAS_TEST_NAMESPACE` (default `gitfaas`, which must carry the labels of
`manifests/base/namespace.yaml`). Any test cluster does: kind (`kind create cluster`), k3d
(`k3d cluster create`), minikube, or a bare control plane with a Job controller and something
that moves pods to Succeeded/Failed (the suite expects a pod whose command contains `fail` to fail).
Without the variables every test is skipped with this explanation; `make test` never needs a cluster.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from gitfaas.embedded import EmbeddedNats
from gitfaas.settings import Settings
from tests.conftest import GitRepo, config_json, make_settings

KUBECONFIG = os.environ.get("GITFAAS_TEST_KUBECONFIG", "")
ADMIN_KUBECONFIG = os.environ.get("GITFAAS_TEST_ADMIN_KUBECONFIG", "")
NAMESPACE = os.environ.get("GITFAAS_TEST_NAMESPACE", "gitfaas")
HOW = ("needs a real cluster: set GITFAAS_TEST_KUBECONFIG (the gitfaas-consumer ServiceAccount with the Role of "
       "manifests/base) and GITFAAS_TEST_ADMIN_KUBECONFIG (an admin); any test cluster does — kind create cluster, "
       "k3d cluster create, minikube — see tests/k8s/conftest.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KUBECONFIG and ADMIN_KUBECONFIG:
        return
    skip = pytest.mark.skip(reason=HOW)
    for item in items:
        if "tests/k8s/" in str(item.fspath).replace(os.sep, "/"):
            item.add_marker(skip)


# A Job that passes the `restricted` Pod Security profile; `fail` in its command makes it fail.
RESTRICTED_JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}
spec:
  backoffLimit: 0
  ttlSecondsAfterFinished: {ttl}
  template:
    spec:
      restartPolicy: Never
      securityContext:
        runAsNonRoot: true
        runAsUser: 65534
        seccompProfile: {{type: RuntimeDefault}}
      containers:
        - name: main
          image: busybox:1.36
          command: ["sh", "-c", "{command}"]
          securityContext:
            allowPrivilegeEscalation: false
            capabilities: {{drop: ["ALL"]}}
          env:
            - name: MESSAGE
              value: "{{{{MESSAGE}}}}"
"""


def job(name: str = "k8s-{{RANDOM}}", command: str = "echo ok", ttl: int = 600) -> str:
    return RESTRICTED_JOB.format(name=name, command=command, ttl=ttl)


def k8s_settings(nats: EmbeddedNats, repo: GitRepo, tmp_path: Path, kubeconfig: str = KUBECONFIG,
                 **overrides: Any) -> Settings:
    return make_settings(nats, None, repo.path, tmp_path, executor="kubernetes", kubeconfig=kubeconfig,
                         kube_namespace=NAMESPACE, **overrides)


@pytest.fixture
def k8s_repo(tmp_path: Path) -> GitRepo:
    repository = GitRepo(tmp_path / "repo")
    repository.commit({"config.json": config_json({"ok": ["ok.yaml"], "bad": ["bad.yaml"]}),
                       "ok.yaml": job(), "bad.yaml": job(command="echo fail; exit 1")}, "initial")
    return repository


@contextlib.asynccontextmanager
async def admin_client() -> AsyncIterator[k8s_client.ApiClient]:
    configuration = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=ADMIN_KUBECONFIG, client_configuration=configuration)
    async with k8s_client.ApiClient(configuration) as api:
        yield api


@pytest.fixture
async def admin() -> AsyncIterator[k8s_client.ApiClient]:
    async with admin_client() as api:
        yield api


async def read_job(admin: k8s_client.ApiClient, name: str) -> dict[str, Any] | None:
    response = await k8s_client.BatchV1Api(admin).read_namespaced_job(name, NAMESPACE, _preload_content=False)
    async with response:
        if response.status == 404:
            return None
        assert response.status == 200, await response.text()
        return json.loads(await response.read())


async def delete_jobs(admin: k8s_client.ApiClient, names: list[str]) -> None:
    """Clean up, finalizers included (as the README's uninstall step does)."""
    batch = k8s_client.BatchV1Api(admin)
    for name in names:
        with contextlib.suppress(Exception):
            await batch.patch_namespaced_job(name, NAMESPACE, {"metadata": {"finalizers": None}},
                                             _content_type="application/merge-patch+json")
        with contextlib.suppress(Exception):
            await batch.delete_namespaced_job(name, NAMESPACE, propagation_policy="Background")


def kubeconfig_with_server(path: str, server: str) -> str:
    """A copy of a kubeconfig whose cluster is reached at `server` (same TLS name: 127.0.0.1)."""
    data = yaml.safe_load(Path(path).read_text())
    for cluster in data.get("clusters") or []:
        cluster["cluster"]["server"] = server
    handle, copy = tempfile.mkstemp(prefix="gitfaas-k8s-", suffix=".kubeconfig")
    with os.fdopen(handle, "w") as out:
        yaml.safe_dump(data, out)
    return copy


def server_of(path: str) -> str:
    data = yaml.safe_load(Path(path).read_text())
    return str(data["clusters"][0]["cluster"]["server"])


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
