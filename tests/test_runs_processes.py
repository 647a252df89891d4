"""Issue 15 with real processes: local Jobs' logs across a `gitfaas up` restart, cancelling a local
Job, and schedules published once per tick by two consumer processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import nats

from gitfaas.embedded import EmbeddedNats
from tests.conftest import wait_for
from tests.processes import ROOT, ConsumerProcess, Up, processes_mentioning

LOCAL_JOB = """\
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
          image: busybox
          command: ["sh", "-c", {script}]
"""


def local_repo(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"topics": [
        {"name": "talk", "configs": ["talk.yaml"]}, {"name": "fail", "configs": ["fail.yaml"]},
        {"name": "sleep", "configs": ["sleep.yaml"]}]}))
    (path / "talk.yaml").write_text(LOCAL_JOB.format(name="talk", script=json.dumps("echo first line; echo second")))
    (path / "fail.yaml").write_text(LOCAL_JOB.format(name="fail", script=json.dumps("echo going wrong; exit 3")))
    (path / "sleep.yaml").write_text(LOCAL_JOB.format(name="sleep", script=json.dumps("echo sleeping; exec sleep 60")))
    return path


def gitfaas(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "NATS_URL"} | {"GITFAAS_STATE_DIR": str(state)}
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


async def state_of(http: aiohttp.ClientSession, up: Up, request_id: str, *states: str) -> dict[str, Any]:
    async def reached() -> dict[str, Any] | None:
        async with http.get(f"http://127.0.0.1:{up.port}/requests/{request_id}") as response:
            document = await response.json()
        return document if response.status == 200 and document["state"] in states else None

    return dict(await wait_for(reached, timeout=30, message=f"{request_id} to be {states}"))


async def test_local_logs_survive_a_restart_and_cancel_kills_the_job(tmp_path: Path) -> None:
    repo, state = local_repo(tmp_path / "repo"), tmp_path / "state"
    up = await Up(tmp_path, "up1", repo, state).start().wait_ready()
    try:
        async with aiohttp.ClientSession() as http:
            talk, fail = await up.publish("talk"), await up.publish("fail")
            await state_of(http, up, talk, "succeeded")
            failed = await state_of(http, up, fail, "failed")
            assert "last output: going wrong" in failed["documents"][0]["reason"]

            sleeper = await up.publish("sleep")
            job = (await state_of(http, up, sleeper, "running"))["documents"][0]["name"]
            await wait_for(lambda: (state / "logs" / "default" / f"{job}.log").exists(), message="its log")
            await wait_for(lambda: "sleep 60" in " ".join(processes_mentioning("sleep 60").values()) or None,
                           message="the sleeping process")
            result = gitfaas(state, "cancel", sleeper[:8])
            assert result.returncode == 0, result.stderr
            assert "cancelled" in result.stdout and job in result.stdout
            document = await state_of(http, up, sleeper, "cancelled")
            assert "Cancelled" in document["documents"][0]["reason"]
            await wait_for(lambda: not [c for c in processes_mentioning("sleep 60").values() if "sleep 60" in c],
                           message="the Job's process to be killed")
            assert gitfaas(state, "cancel", sleeper).returncode == 0, "idempotent"
            done = gitfaas(state, "cancel", talk)
            assert done.returncode == 1 and "nothing to cancel" in done.stderr
        up.process.send_signal(2)  # type: ignore[union-attr]
        assert await up.wait_exit() == 0
    finally:
        up.cleanup()

    again = await Up(tmp_path, "up2", repo, state).start().wait_ready()
    try:
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{again.port}/requests/{talk}/logs") as response:
            text = await response.text()
            assert response.status == 200, text
        lines = text.splitlines()
        assert [line for line in lines if "line" in line or "second" in line] == [
            f"[{name}] first line", f"[{name}] second"] if (name := lines[0][1:].split("]")[0]) else False
        assert name.startswith("talk-")
        result = gitfaas(state, "logs", talk[:8])
        assert result.returncode == 0 and "first line" in result.stdout and f"[{name}]" in result.stdout
        result = gitfaas(state, "runs")
        assert result.returncode == 0 and talk in result.stdout and "succeeded" in result.stdout
        assert sleeper in result.stdout and "cancelled" in result.stdout
        result = gitfaas(state, "status", fail[:8], "--tree")
        assert result.returncode == 0 and "failed" in result.stdout and "going wrong" in result.stdout
    finally:
        again.cleanup()


SCHEDULED = {"topics": [{"name": "tick", "configs": ["tick.yaml"], "schedule": "* * * * * *",
                         "message": {"from": "schedule"}}]}
TICK_JOB = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: tick-{{RANDOM}}
data:
  message: "{{MESSAGE}}"
"""


async def test_two_consumer_processes_publish_each_tick_once(nats_server: EmbeddedNats, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "config.json").write_text(json.dumps(SCHEDULED))
    (repo / "tick.yaml").write_text(TICK_JOB)
    env = {"NATS_URL": nats_server.url, "GIT_URL": str(repo), "EXECUTOR": "dry-run", "GIT_POLL_SECONDS": "0"}
    consumers = [ConsumerProcess({**env, "GIT_CACHE_DIR": str(tmp_path / f"cache-{i}")}, tmp_path / f"c{i}.log")
                 for i in range(2)]
    try:
        for consumer in consumers:
            await consumer.start()
        nc = await nats.connect(nats_server.url)
        try:
            js = nc.jetstream()

            async def ticks() -> list[str]:
                info = await js.stream_info("GITFAAS")
                found = []
                for seq in range(max(1, info.state.first_seq), info.state.last_seq + 1):
                    msg = await js.get_msg("GITFAAS", seq)
                    found.append((msg.headers or {}).get("Gitfaas-Schedule", ""))
                return found

            async def eleven() -> list[str] | None:
                found = await ticks()
                return found if len(set(found)) >= 12 else None

            await wait_for(eleven, timeout=30, interval=0.2, message="12 ticks")
            counted = 0
            for consumer in consumers:
                async with aiohttp.ClientSession() as http, \
                        http.get(f"http://127.0.0.1:{consumer.port}/metrics") as response:
                    text = await response.text()
                counted += int(sum(float(v) for v in re.findall(
                    r'^gitfaas_schedule_ticks_total\{topic="tick"\} (\S+)$', text, re.M)))
            found = await ticks()
            msg = await js.get_msg("GITFAAS", 1)
        finally:
            await nc.close()
        per_tick = Counter(found)
        assert "" not in per_tick, "every message is a scheduled one"
        ordered = sorted(per_tick)
        assert all(per_tick[t] == 1 for t in ordered), per_tick
        seconds = [int(datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()) for t in ordered]
        middle = seconds[1:11]  # ten consecutive ticks, none missing
        assert middle == list(range(middle[0], middle[0] + 10)), ordered
        assert len(found) - 1 <= counted <= len(found), (counted, len(found))  # the metric counts stored ticks
        assert json.loads(msg.data) == {"from": "schedule"}
        assert (msg.headers or {})["Nats-Msg-Id"] == f"gitfaas-schedule:tick:{ordered[0]}"
        assert all(consumer.process is not None and consumer.process.poll() is None for consumer in consumers)
    finally:
        for consumer in consumers:
            consumer.stop()

