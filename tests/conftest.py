"""Shared test harness: a real nats-server, the Kubernetes emulator, git repositories in tmp dirs.

Nothing here sleeps to synchronise: `wait_for` polls a condition against a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.app import Bridge, serve
from consumer.service import Consumer
from gitfaas import logs
from gitfaas.embedded import EmbeddedNats, free_port
from gitfaas.settings import Settings
from tests.emulator import EmulatorHandle, running_emulator

logs.configure("INFO", "console")

JOB_TEMPLATE = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}-{{{{RANDOM}}}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: busybox:1.36
          command: ["sh", "-c", "echo $MESSAGE"]
          env:
            - name: MESSAGE
              value: "{{{{MESSAGE}}}}"
            - name: REQUEST_UUID
              value: "{{{{REQUEST_UUID}}}}"
            - name: FUNCTION_UID
              value: "{{{{ FUNCTION_UID }}}}"
            - name: BRIDGE_URL
              value: "{{{{BRIDGE_URL}}}}"
            - name: NATS_URL
              value: "{{{{NATS_URL}}}}"
"""


def job_manifest(name: str) -> str:
    return JOB_TEMPLATE.format(name=name)


async def wait_for(
    condition: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.02,
    message: str = "condition",
) -> Any:
    """Poll until `condition()` is truthy; return its value, or fail naming what never happened."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        await asyncio.sleep(interval)


class GitRepo:
    """A real git repository in a tmp dir; `commit(files)` writes and commits on `main`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.git("init", "-q", "-b", "main")
        self.git("config", "user.email", "test@example.invalid")
        self.git("config", "user.name", "test")

    def git(self, *args: str) -> str:
        return subprocess.run(["git", *args], cwd=self.path, check=True, capture_output=True, text=True).stdout

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        for name, content in files.items():
            target = self.path / name
            if content is None:
                target.unlink(missing_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)
        return self.git("rev-parse", "HEAD").strip()


def config_json(topics: dict[str, list[str]], **extra: dict[str, Any]) -> str:
    return json.dumps({"topics": [{"name": name, "configs": files, **extra.get(name, {})}
                                  for name, files in topics.items()]}, indent=2)


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def k8s(tmp_path: Path) -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(tmp_path) as handle:
        yield handle


@pytest.fixture
def repo(tmp_path: Path) -> GitRepo:
    repository = GitRepo(tmp_path / "repo")
    repository.commit({
        "config.json": config_json({"hello": ["hello.yaml"]}),
        "hello.yaml": job_manifest("hello"),
    }, "initial")
    return repository


@dataclass
class Stack:
    """Bridge + consumer(s) running in this process against real NATS and the emulator."""

    settings: Settings
    bridge: Bridge
    bridge_url: str
    consumers: list[Consumer]
    http: aiohttp.ClientSession
    _runners: list[Any] = field(default_factory=list)

    async def publish(self, topic: str, body: bytes | str | None = None, *, params: dict[str, str] | None = None,
                      headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        response = await self.http.post(f"{self.bridge_url}/publish/{topic}", data=body, params=params,
                                        headers=headers)
        await response.read()
        return response

    async def get_json(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.bridge_url + path) as response:
            return response.status, await response.json()


def make_settings(nats: EmbeddedNats, k8s: EmulatorHandle | None, repo: Path, tmp_path: Path,
                  **overrides: Any) -> Settings:
    port = free_port()
    base = Settings(
        nats_url=nats.url,
        git_url=str(repo),
        git_cache_dir=str(tmp_path / "git-cache"),
        git_poll_seconds=0,
        executor="kubernetes" if k8s else "dry-run",
        kubeconfig=str(k8s.kubeconfig) if k8s else None,
        kube_namespace="default",
        bridge_host="127.0.0.1",
        bridge_port=port,
        bridge_url=f"http://127.0.0.1:{port}",
        consumer_host="127.0.0.1",
        consumer_http_port=0,
        log_format="console",
    )
    return base.replace(**overrides)


@contextlib.asynccontextmanager
async def running_stack(settings: Settings, consumers: int = 1) -> AsyncIterator[Stack]:
    started: list[Consumer] = []
    bridge = Bridge(settings)
    runner = None
    try:
        for index in range(consumers):
            consumer = Consumer(settings.replace(git_cache_dir=f"{settings.git_cache_dir}-{index}"))
            await consumer.start()
            started.append(consumer)
        await bridge.start()
        runner = await serve(bridge, settings.bridge_host, settings.bridge_port)
        async with aiohttp.ClientSession() as http:
            stack = Stack(settings, bridge, f"http://127.0.0.1:{settings.bridge_port}", started, http)
            # The bridge learns the topics through the key-value watch; wait until it has them.
            await wait_for(lambda: bridge.config_state is not None, message="bridge to see the configuration")
            yield stack
    finally:
        if runner is not None:
            await runner.cleanup()
        await bridge.stop()
        for consumer in started:
            await consumer.stop(grace=2)


@pytest.fixture
async def stack(nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
                ) -> AsyncIterator[Stack]:
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as running:
        yield running
