"""Issue 12: the kubernetes executor's API discovery cache is its own, and goes when the executor does.

Its file used to be named after the process id and `id(executor)`: once an executor was freed, a
later one could get the same id and read the earlier one's cache (another cluster's, or a stale
one), and the files were never removed.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from consumer.executors.base import NoJobEvents
from consumer.executors.kubernetes import KubernetesExecutor
from gitfaas.settings import Settings
from tests.emulator import EmulatorHandle


async def test_every_executor_has_its_own_discovery_cache_removed_at_close(
        k8s: EmulatorHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))  # what tempfile.gettempdir() answers
    settings = Settings(executor="kubernetes", kubeconfig=str(k8s.kubeconfig), kube_namespace="default")
    configmap = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "namespace": "default"}}

    first, second = KubernetesExecutor(settings), KubernetesExecutor(settings)
    try:
        await first.start(NoJobEvents())
        await second.start(NoJobEvents())
        await first.apply(dict(configmap))  # discovery runs, and is written to the cache
        await second.apply(dict(configmap))
        caches = sorted(temporary.iterdir())
        assert len(caches) == 2 and all(path.is_dir() for path in caches), caches
        assert all(any(path.iterdir()) for path in caches), "each holds its executor's discovery"
        await first.close()
        (remaining,) = temporary.iterdir()  # the closed executor's cache is gone, the open one's intact
        assert remaining in caches and any(remaining.iterdir())
    finally:
        await first.close()  # closing twice is harmless
        await second.close()
    assert list(temporary.iterdir()) == []
