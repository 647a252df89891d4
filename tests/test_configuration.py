"""Unit tests for `consumer/configuration.py`: loading and checking one commit's config.json."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from consumer.configuration import ConfigurationError, load_configuration
from gitfaas.settings import Settings

SETTINGS = Settings(kube_namespace="default", allowed_namespaces=("default", "pipelines"))


def job(name: str = "hello", *, namespace: str | None = None, kind: str = "Job", generate: bool = False) -> str:
    key = "generateName" if generate else "name"
    ns = f"\n  namespace: {namespace}" if namespace else ""
    return f"""\
apiVersion: batch/v1
kind: {kind}
metadata:
  {key}: {name}{ns}
spec:
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: busybox:1.36
          env:
            - name: MESSAGE
              value: "{{{{MESSAGE}}}}"
"""


def write_repo(root: Path, files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
    return root


def config(*topics: dict) -> str:
    return json.dumps({"topics": list(topics)})


def problems_of(root: Path, settings: Settings = SETTINGS) -> list[str]:
    with pytest.raises(ConfigurationError) as caught:
        load_configuration(root, "c0ffee" * 6, settings)
    return caught.value.problems


def has_problem(problems: list[str], *fragments: str) -> bool:
    return any(all(fragment in problem for fragment in fragments) for problem in problems)


# ---- good repositories ---------------------------------------------------------------------------


def test_a_good_repository_gives_its_topics_and_documents(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config(
            {"name": "timeToCollect", "configs": ["collect.yaml"]},
            {"name": "timeToUncompress", "configs": ["uncompress.yaml", "audit.yaml"], "namespace": "pipelines",
             "maxConcurrency": 2, "maxActiveJobs": 3, "retries": 1},
        ),
        "collect.yaml": job("collect"),
        "uncompress.yaml": job("uncompress") + "---\n" + job("uncompress-2"),
        "audit.yaml": job("audit"),
    })

    configuration = load_configuration(root, "abc123", SETTINGS)

    assert configuration.commit == "abc123"
    assert list(configuration.topics) == ["timeToCollect", "timeToUncompress"]
    collect = configuration.topics["timeToCollect"]
    assert collect.configs == ("collect.yaml",)
    assert [doc.sample()["metadata"]["name"] for doc in collect.documents] == ["collect"]
    assert "MESSAGE" in collect.variables
    uncompress = configuration.topics["timeToUncompress"]
    assert [doc.sample()["metadata"]["name"] for doc in uncompress.documents] == [
        "uncompress", "uncompress-2", "audit"]
    assert uncompress.namespace == "pipelines"
    assert (uncompress.max_concurrency, uncompress.max_active_jobs, uncompress.retries) == (2, 3, 1)
    summary = configuration.summary()
    assert summary["commit"] == "abc123"
    assert [topic["name"] for topic in summary["topics"]] == ["timeToCollect", "timeToUncompress"]


def test_manifests_is_an_alias_of_configs(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "t", "manifests": ["jobs/a.yaml"]}),
        "jobs/a.yaml": job("a"),
    })

    topic = load_configuration(root, "c1", SETTINGS).topics["t"]

    assert topic.configs == ("jobs/a.yaml",)
    assert len(topic.documents) == 1


def test_generate_name_is_accepted_as_the_name(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "t", "configs": ["a.yaml"]}),
        "a.yaml": job("worker-", generate=True),
    })

    topic = load_configuration(root, "c1", SETTINGS).topics["t"]

    assert topic.documents[0].sample()["metadata"]["generateName"] == "worker-"


def test_a_symlink_inside_the_repository_is_accepted(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "t", "configs": ["current.yaml"]}),
        "versions/v2.yaml": job("v2"),
    })
    os.symlink("versions/v2.yaml", root / "current.yaml")

    topic = load_configuration(root, "c1", SETTINGS).topics["t"]

    assert topic.documents[0].sample()["metadata"]["name"] == "v2"


def test_the_config_path_setting_is_honoured(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "deploy/topics.json": config({"name": "t", "configs": ["a.yaml"]}),
        "a.yaml": job("a"),
    })

    configuration = load_configuration(root, "c1", SETTINGS.replace(config_path="deploy/topics.json"))

    assert list(configuration.topics) == ["t"]


def test_a_namespace_from_allowed_namespaces_is_accepted(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "t", "configs": ["a.yaml"], "namespace": "pipelines"}),
        "a.yaml": job("a", namespace="pipelines"),
    })

    assert load_configuration(root, "c1", SETTINGS).topics["t"].namespace == "pipelines"


# ---- every problem, all at once ------------------------------------------------------------------


def test_every_problem_of_a_bad_repository_is_listed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "job.yaml").write_text(job("escaped"))
    root = write_repo(tmp_path / "repo", {
        "config.json": config(
            {"name": "bad topic", "configs": ["ok.yaml"]},
            {"name": "missing", "configs": ["nowhere.yaml"]},
            {"name": "dotdot", "configs": ["../outside/job.yaml"]},
            {"name": "absolute", "configs": [str(outside / "job.yaml")]},
            {"name": "linked", "configs": ["escape.yaml"]},
            {"name": "banned", "configs": ["secret.yaml"]},
            {"name": "nameless", "configs": ["nameless.yaml"]},
            {"name": "broken", "configs": ["broken.yaml"]},
            {"name": "elsewhere", "configs": ["ok.yaml"], "namespace": "kube-system"},
            {"name": "twice", "configs": ["ok.yaml"]},
            {"name": "twice", "configs": ["ok.yaml"]},
            {"name": "typed", "configs": ["ok.yaml"], "maxConcurrency": "4"},
            {"name": "docns", "configs": ["docns.yaml"]},
        ),
        "ok.yaml": job("ok"),
        "secret.yaml": "apiVersion: v1\nkind: Secret\nmetadata:\n  name: creds\nstringData:\n  a: b\n",
        "nameless.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  labels: {a: b}\ndata: {}\n",
        "broken.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: [unclosed\n",
        "docns.yaml": job("docns", namespace="kube-public"),
    })
    os.symlink(outside / "job.yaml", root / "escape.yaml")

    problems = problems_of(root)

    assert has_problem(problems, "topics[0]", "bad topic", "not valid")
    assert has_problem(problems, "nowhere.yaml", "not found")
    assert has_problem(problems, "../outside/job.yaml", "relative")
    assert has_problem(problems, str(outside / "job.yaml"), "relative")
    assert has_problem(problems, "escape.yaml", "symbolic link")
    assert has_problem(problems, "secret.yaml:2", "Secret", "banned")  # the line of the kind
    assert has_problem(problems, "nameless.yaml:1", "metadata.name")
    assert any(re.match(r"broken\.yaml:\d+: ", problem) for problem in problems)
    assert has_problem(problems, "kube-system", "ALLOWED_NAMESPACES")
    assert has_problem(problems, "twice", "defined twice")
    assert has_problem(problems, "maxConcurrency", "'4'")
    assert has_problem(problems, "docns.yaml:5", "kube-public")  # the line of the namespace
    assert len(problems) >= 12
    # Nothing of the escaped file was ever read as a manifest.
    assert not any("escaped" in problem for problem in problems)


def test_invalid_yaml_is_reported_with_its_file_and_line(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "t", "configs": ["broken.yaml"]}),
        "broken.yaml": "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: [1, 2\n  b: c: d\n",
    })

    problems = problems_of(root)

    assert len(problems) == 1
    file_and_line = problems[0].split(": ", 1)[0]
    source, line = file_and_line.split(":")
    assert source == "broken.yaml"
    assert 6 <= int(line) <= 8


def test_the_error_names_the_commit(tmp_path):
    root = write_repo(tmp_path / "repo", {"config.json": config({"name": "t", "configs": ["gone.yaml"]})})

    with pytest.raises(ConfigurationError) as caught:
        load_configuration(root, "0123456789abcdef0123", SETTINGS)

    assert caught.value.commit == "0123456789abcdef0123"
    assert "0123456789ab" in str(caught.value)
    assert "gone.yaml" in str(caught.value)


@pytest.mark.parametrize("value", ["4", 0, -1, 1.5, True])
def test_max_concurrency_must_be_a_positive_whole_number(tmp_path, value):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "t", "configs": ["a.yaml"], "maxConcurrency": value}),
        "a.yaml": job("a"),
    })

    assert has_problem(problems_of(root), "maxConcurrency", "whole number")


def test_invalid_json_names_config_json(tmp_path):
    root = write_repo(tmp_path / "repo", {"config.json": '{"topics": [ {"name": "t", }'})

    problems = problems_of(root)

    assert len(problems) == 1
    assert problems[0].startswith("config.json")
    assert "JSON" in problems[0]


def test_config_json_without_a_topics_list_is_refused(tmp_path):
    root = write_repo(tmp_path / "repo", {"config.json": json.dumps({"topic": []})})

    assert has_problem(problems_of(root), "config.json", "topics")


def test_a_missing_config_json_is_reported(tmp_path):
    root = write_repo(tmp_path / "repo", {"a.yaml": job("a")})

    assert has_problem(problems_of(root), "config.json", "not found")


def test_a_config_json_linking_outside_the_repository_is_refused(tmp_path):
    outside = write_repo(tmp_path / "outside", {"config.json": config({"name": "t", "configs": ["a.yaml"]})})
    root = write_repo(tmp_path / "repo", {"a.yaml": job("a")})
    os.symlink(outside / "config.json", root / "config.json")

    assert has_problem(problems_of(root), "config.json", "symbolic link")


def test_a_kind_banned_by_the_settings_is_refused(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "t", "configs": ["a.yaml"]}),
        "a.yaml": job("a"),
    })

    assert has_problem(problems_of(root, SETTINGS.replace(banned_kinds=("Job",))), "a.yaml:2", "Job", "banned")


def test_one_bad_file_refuses_the_whole_commit(tmp_path):
    root = write_repo(tmp_path / "repo", {
        "config.json": config({"name": "good", "configs": ["a.yaml"]}, {"name": "bad", "configs": ["b.yaml"]}),
        "a.yaml": job("a"),
        "b.yaml": "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n",
    })

    problems = problems_of(root)

    assert problems and all("a.yaml" not in problem for problem in problems)
