"""Issue 8: what an operator sees — metrics on both services and the stall signal."""

from __future__ import annotations

import re
from pathlib import Path

from gitfaas.embedded import EmbeddedNats
from tests.conftest import GitRepo, Stack, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if match and all(f'{k}="{v}"' in (match.group(1) or "") for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def consumer_text(stack: Stack, path: str = "/metrics") -> str:
    port = stack.consumers[0].http_port
    async with stack.http.get(f"http://127.0.0.1:{port}{path}") as response:
        return await response.text()


async def test_metrics_count_publishes_applies_and_latency(stack: Stack, k8s: EmulatorHandle) -> None:
    before = await consumer_text(stack)
    for _ in range(3):
        assert (await stack.publish("hello", "x")).status == 202
    assert (await stack.publish("nope", "x")).status == 404
    await wait_for(lambda: len(k8s.jobs()) == 3, message="three Jobs")

    async with stack.http.get(f"{stack.bridge_url}/metrics") as response:
        bridge = await response.text()
    assert metric(bridge, "gitfaas_bridge_publishes_total", topic="hello", code="202") >= 3
    assert metric(bridge, "gitfaas_bridge_publishes_total", code="404") >= 1
    assert metric(bridge, "gitfaas_bridge_publish_seconds_count") >= 3

    async def applied_three() -> str | None:
        text = await consumer_text(stack)
        done = metric(text, "gitfaas_consumer_messages_total", topic="hello", outcome="applied")
        return text if done - metric(before, "gitfaas_consumer_messages_total", topic="hello",
                                     outcome="applied") >= 3 else None

    text = await wait_for(applied_three, message="three applied messages counted")
    assert metric(text, "gitfaas_consumer_end_to_end_seconds_count") >= 3
    assert metric(text, "gitfaas_consumer_apply_seconds_count") >= 3
    assert metric(text, "gitfaas_config_commit_info", commit=stack.consumers[0].config.commit) == 1


async def test_stall_signal_when_messages_wait_and_nothing_is_applied(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, stall_seconds=0.5)
    async with running_stack(settings) as stack:
        with k8s.emulator.failing(503):  # the API server is down: every apply fails, transiently
            assert (await stack.publish("hello", "stuck")).status == 202

            async def stalled() -> bool:
                return metric(await consumer_text(stack), "gitfaas_consumer_stalled") == 1

            await wait_for(stalled, timeout=15, message="the stall signal")
            async with stack.http.get(f"http://127.0.0.1:{stack.consumers[0].http_port}/readyz") as response:
                detail = await response.json()
            assert detail["stalled"] is True and detail["queue"]["pending"] + detail["queue"]["ack_pending"] >= 1
        await wait_for(lambda: len(k8s.jobs()) == 1, timeout=30, message="the message applied once the API heals")

        async def recovered() -> bool:
            return metric(await consumer_text(stack), "gitfaas_consumer_stalled") == 0

        await wait_for(recovered, timeout=15, message="the stall signal to clear")
