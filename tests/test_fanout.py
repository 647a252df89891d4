"""Issue 12: a topic whose one manifest file holds several Jobs (a fan-out) runs each of them, end to end.

With the local executor every Job is a real process: each must run once, with its own document's
values (its name, its env, its FUNCTION_UID), and the request succeeds when all of them have.
Waits are the bridge's own `?wait=completed` (answered when the request ends) or conditions polled
against a deadline.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from pathlib import Path

import aiohttp

from gitfaas.embedded import EmbeddedNats
from tests.conftest import GitRepo, config_json, make_settings, running_stack
from tests.processes import ROOT, Up, processes_mentioning

PARTS = 10
# What each Job's process writes: the values its own document gave it.
REPORT = ("import json, os, pathlib; keys = ('PART', 'MESSAGE', 'FUNCTION_UID', 'GITFAAS_JOB_NAME'); "
          "pathlib.Path(os.environ['GITFAAS_VOLUME_OUT'], os.environ['PART'] + '.json')"
          ".write_text(json.dumps({key: os.environ[key] for key in keys}))")
JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: fanout-{index}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: part
          image: python:3.11-slim
          command: [{python}, "-c", {code}]
          env:
            - name: PART
              value: "{index}"
            - name: MESSAGE
              value: "{{{{MESSAGE}}}}"
            - name: FUNCTION_UID
              value: "{{{{FUNCTION_UID}}}}"
      volumes:
        - name: out
          persistentVolumeClaim:
            claimName: fanout-out
"""


def ten_jobs_file() -> str:
    """The file of the issue: ten Jobs separated by `---`, each with a literal metadata.name."""
    return "---\n".join(JOB.format(index=index, python=json.dumps(sys.executable), code=json.dumps(REPORT))
                        for index in range(PARTS))


async def test_ten_jobs_in_one_file_each_run_once_with_their_own_values(
        nats_server: EmbeddedNats, tmp_path: Path) -> None:
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json({"fanout": ["jobs.yaml"]}), "jobs.yaml": ten_jobs_file()})
    state = tmp_path / "state"
    settings = make_settings(nats_server, None, repo.path, tmp_path, executor="local", state_dir=str(state))
    async with running_stack(settings) as stack:
        response = await stack.http.post(f"{stack.bridge_url}/publish/fanout?wait=completed&timeout=60",
                                         data=b"one message, ten Jobs")
        document = await response.json()
    assert response.status == 200, document
    assert document["state"] == "succeeded", document
    assert [(entry["kind"], entry["name"], entry["state"]) for entry in document["documents"]] == [
        ("Job", f"fanout-{index}", "succeeded") for index in range(PARTS)]

    reports = [json.loads((state / "volumes" / "fanout-out" / f"{index}.json").read_text()) for index in range(PARTS)]
    message = base64.b64encode(b"one message, ten Jobs").decode()
    assert [(report["PART"], report["GITFAAS_JOB_NAME"], report["MESSAGE"]) for report in reports] == [
        (str(index), f"fanout-{index}", message) for index in range(PARTS)]
    uids = [report["FUNCTION_UID"] for report in reports]
    assert len(set(uids)) == PARTS and all(f".{index}." in uid for index, uid in enumerate(uids)), uids
    markers = sorted(path.name for path in (state / "jobs" / "default").iterdir())
    assert markers == sorted(f"fanout-{index}" for index in range(PARTS)), "each Job ran once"


async def test_up_runs_the_example_fan_out_one_job_per_sensor(tmp_path: Path) -> None:
    """examples/pipeline's timeToSurvey: five Jobs in survey.yaml, each answering for its own sensor."""
    state = tmp_path / "state"
    up = Up(tmp_path, "up", ROOT / "examples" / "pipeline", state)
    bridge = f"http://127.0.0.1:{up.port}"
    try:
        await asyncio.to_thread(up.start)
        await up.wait_ready()
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{bridge}/publish/timeToSurvey?wait=completed&timeout=60",
                                 json={"rows": 30, "seed": 7}) as response:
                document = await response.json()
                assert response.status == 200, document
            async with http.get(f"{bridge}/response/{document['request_id']}") as response:
                answers = (await response.json())["responses"]

        assert document["state"] == "succeeded", document
        sensors = [f"s{index}" for index in range(5)]
        names = [entry["name"] for entry in document["documents"]]
        assert [name.rsplit("-", 1)[0] for name in names] == [f"survey-{sensor}" for sensor in sensors]
        assert len(set(names)) == len(sensors)
        run = f"run-{document['request_id'][:8]}"
        assert [(answer["sensor"], answer["run"], answer["rows"]) for answer in answers] == [
            (sensor, run, 30) for sensor in sensors], "one answer per Job, in the file's order"
        assert len({answer["mean"] for answer in answers}) == len(sensors), "each sensor its own readings"
        for answer in answers:
            written = state / "volumes" / "pipeline-data" / f"{run}.survey-{answer['sensor']}.json"
            assert json.loads(written.read_text()) == answer
            assert 10 <= answer["min"] <= answer["mean"] <= answer["max"] <= 30
        output = up.output()
        assert all(f"[{name}] surveyed 30 readings of {name.split('-')[1]}" in output for name in names)

        up.process.send_signal(signal.SIGINT)  # type: ignore[union-attr]
        assert await up.wait_exit(timeout=20) == 0, up.output()[-2000:]
        assert processes_mentioning(str(state)) == {}, "no nats-server or function left behind"
    finally:
        up.cleanup()
