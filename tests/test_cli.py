"""Issue 4: the command line a pipeline author and an operator use."""

from __future__ import annotations

import asyncio
import copy
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import yaml

from cli.operator import publish, status
from gitfaas import natsconn, settings_doc
from gitfaas.embedded import EmbeddedNats
from gitfaas.settings import Settings
from tests.conftest import Stack, wait_for
from tests.emulator import EmulatorHandle

ROOT = Path(__file__).resolve().parent.parent


def gitfaas(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env={**os.environ, **(env or {})})


def test_validate_accepts_the_example_pipeline() -> None:
    result = gitfaas("validate", "examples/pipeline")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok: 4 topic(s), 8 document(s)" in result.stdout  # timeToSurvey: a fan-out of 5 Jobs


def test_validate_lists_every_problem_with_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("""{"topics": [
      {"name": "bad topic", "configs": ["job.yaml"]},
      {"name": "missing", "configs": ["nowhere.yaml"]},
      {"name": "escape", "configs": ["../outside.yaml"]},
      {"name": "secret", "configs": ["secret.yaml"]},
      {"name": "broken", "configs": ["broken.yaml"]},
      {"name": "nameless", "configs": ["nameless.yaml"]}
    ]}""")
    (tmp_path / "job.yaml").write_text("apiVersion: batch/v1\nkind: Job\nmetadata:\n  name: j\n")
    (tmp_path / "secret.yaml").write_text("apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n")
    (tmp_path / "broken.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n")
    (tmp_path / "nameless.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels: {}\n")
    result = gitfaas("validate", str(tmp_path))
    assert result.returncode == 1
    out = result.stdout
    assert "'bad topic' is not valid" in out
    assert "config.json:3: nowhere.yaml: manifest file not found" in out  # the line that names the file
    assert "config.json:4: ../outside.yaml: manifest path must be relative and stay inside the repository" in out
    assert "secret.yaml:2: kind Secret is banned" in out  # the line of its kind
    assert "broken.yaml:5: " in out  # the YAML library words the syntax error itself
    assert "nameless.yaml:1: document has no metadata.name" in out
    assert "6 problem(s)" in out


def test_validate_renders_with_sample_values_and_checks_policy(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"topics": [{"name": "t", "configs": ["ns.yaml"]}]}')
    (tmp_path / "ns.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n"
                                      "  namespace: '{{ns}}'\n")
    result = gitfaas("validate", str(tmp_path))
    assert result.returncode == 1
    assert "ns.yaml:5: topic t:" in result.stdout and "'sample' is not allowed" in result.stdout


def _comparable(document: dict[str, Any]) -> dict[str, Any]:
    """What must match between a render and an apply of the same message: everything but the
    values that name one particular request (its id, names derived from it)."""
    doc = copy.deepcopy(document)
    metadata = doc["metadata"]
    kept = {"namespace": metadata["namespace"],
            "labels": {k: v for k, v in metadata["labels"].items() if k != "gitfaas.io/request-id"}}
    spec = doc["spec"]
    spec["template"]["metadata"]["labels"].pop("gitfaas.io/request-id")
    for env in spec["template"]["spec"]["containers"][0]["env"]:
        if env["name"] in ("REQUEST_UUID", "FUNCTION_UID"):
            env["value"] = "-"
    return {"apiVersion": doc["apiVersion"], "kind": doc["kind"], "metadata": kept, "spec": spec}


async def test_render_prints_what_the_consumer_applies(stack: Stack, k8s: EmulatorHandle) -> None:
    response = await stack.publish("hello", "the body")
    assert response.status == 202
    [applied] = await wait_for(lambda: k8s.jobs(), message="the applied Job")
    # The same settings the consumer runs with: what functions are told (NATS_URL, BRIDGE_URL) is part of it.
    result = gitfaas("render", "hello", "--repo", str(stack.settings.git_url), "--message", "the body",
                     env={"NATS_URL": stack.settings.nats_url, "BRIDGE_URL": stack.settings.bridge_url})
    assert result.returncode == 0, result.stderr
    [rendered] = list(yaml.safe_load_all(result.stdout))
    applied_view = {key: applied[key] for key in ("apiVersion", "kind", "metadata", "spec")}
    # The emulator adds server fields; compare only what the manifest sets.
    applied_view["spec"] = {k: v for k, v in applied_view["spec"].items() if k in rendered["spec"]}
    assert _comparable(rendered)["spec"]["template"]["spec"]["containers"][0]["env"][0]["value"] == \
        "dGhlIGJvZHk="  # base64 of the body
    rendered_view = _comparable(rendered)
    assert rendered_view["spec"] == _comparable(applied_view)["spec"]
    assert rendered_view["metadata"]["labels"] == _comparable(applied_view)["metadata"]["labels"]


def test_render_names_missing_variables(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"topics": [{"name": "t", "configs": ["c.yaml"]}]}')
    (tmp_path / "c.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\n"
                                     "data:\n  a: '{{a}}'\n  b: '{{b}}'\n")
    result = gitfaas("render", "t", "--repo", str(tmp_path), "-p", "a=1")
    assert result.returncode == 1
    assert "gitfaas render: topic 't' needs parameter the message does not give: b (" in result.stderr
    result = gitfaas("render", "t", "--repo", str(tmp_path), "-p", "a=1", "-p", "b=two words")
    assert result.returncode == 0
    [document] = list(yaml.safe_load_all(result.stdout))
    assert document["data"] == {"a": "1", "b": "two words"}


async def test_publish_waits_and_status_shows_the_tree(stack: Stack, k8s: EmulatorHandle) -> None:
    out = io.StringIO()
    code = await publish(stack.settings, "hello", b"from the cli", [("x", "1")], "applied", 20.0, out=out)
    assert code == 0, out.getvalue()
    first_line = out.getvalue().splitlines()[0]
    request_id = yaml.safe_load(first_line)["request_id"]
    assert "applied" in out.getvalue() and "Job default/hello-" in out.getvalue()

    child = await stack.publish("hello", "child", params={"parent": request_id})
    child_id = (await child.json())["request_id"]
    await wait_for(lambda: len(k8s.jobs()) == 2, message="the child's Job")

    async def tree() -> str | None:
        buffer = io.StringIO()
        assert await status(stack.settings, request_id, False, True, out=buffer) == 0
        return buffer.getvalue() if child_id in buffer.getvalue() else None

    text = await wait_for(tree, message="the child listed under its parent")
    assert text.index(request_id) < text.index(child_id)
    buffer = io.StringIO()
    assert await status(stack.settings, "no-such-request", False, False, out=buffer) == 1


# ---- small things people expect -------------------------------------------------------------------


def test_version_is_printed() -> None:
    result = gitfaas("--version")
    assert result.returncode == 0
    assert re.fullmatch(r"gitfaas \d+\.\d+\.\d+\S*\n", result.stdout), result.stdout


def _settings_read_by_the_services() -> set[str]:
    """Every variable `Settings.from_env` reads, from its source (so a new setting cannot be forgotten)."""
    source = (ROOT / "gitfaas" / "settings.py").read_text()
    body = source[source.index("def from_env"):source.index("def _own_namespace")]
    return set(re.findall(r'"([A-Z][A-Z0-9_]+)"', body)) - set(settings_doc.ALIASES)


def test_service_help_lists_every_setting_the_service_reads() -> None:
    documented = {variable.name for variable in settings_doc.VARIABLES}
    assert _settings_read_by_the_services() <= documented, "document these in gitfaas/settings_doc.py"
    for service in (settings_doc.BRIDGE, settings_doc.CONSUMER):
        shown = gitfaas(service, "--help").stdout
        for variable in settings_doc.VARIABLES:
            assert (variable.name in shown) == (service in variable.services), (service, variable.name)


def test_help_texts_carry_no_internal_section_numbers_and_examples_use_real_topics() -> None:
    topics = {topic["name"] for topic in json.loads((ROOT / "examples/pipeline/config.json").read_text())["topics"]}
    commands = ["up", "bridge", "consumer", "publish", "status", "validate", "render", "replay", "dead"]
    for command in [None, *commands]:
        text = gitfaas(*([command] if command else []), "--help").stdout
        assert "§" not in text, command
        examples = text.partition("\nexample")[2]
        for example in re.findall(r"gitfaas (?:publish|render) (\S+)", examples):
            assert example in topics, f"{command} --help uses topic {example!r}"
        for example in re.findall(r"--topic (\S+)", examples):
            assert example in topics, f"{command} --help uses topic {example!r}"


async def test_dead_purge_asks_first_and_refuses_without_a_terminal(nats_server: EmbeddedNats) -> None:
    settings = Settings(nats_url=nats_server.url)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await natsconn.ensure_stream(js, natsconn.dead_stream_config(settings))
        await js.publish("gitfaas.dead.timeToCollect", b"lost", headers={"Gitfaas-Error": "boom"})
    finally:
        await nc.close()
    env = {"NATS_URL": nats_server.url}

    refused = await asyncio.to_thread(gitfaas, "dead", "purge", env=env)
    assert refused.returncode == 1
    assert "1 dead letter(s) would be deleted for good; add --yes to confirm" in refused.stderr
    assert "1 " in (await asyncio.to_thread(gitfaas, "dead", "list", env=env)).stdout

    purged = await asyncio.to_thread(gitfaas, "dead", "purge", "--yes", env=env)
    assert purged.returncode == 0, purged.stderr
    assert "purged 1 dead letter(s)" in purged.stdout
    assert "no dead letters" in (await asyncio.to_thread(gitfaas, "dead", "list", env=env)).stdout
