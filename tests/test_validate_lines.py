"""Issue 11: `gitfaas validate` catches misspelt variables and points at the line to fix."""

from __future__ import annotations

import io
import json
from pathlib import Path

from cli.authoring import validate
from consumer.locate import ManifestLines
from gitfaas.settings import Settings

SETTINGS = Settings(kube_namespace="default")

JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: job-{{RANDOM}}
spec:
  parallelism: {{replica}}
  template:
    spec:
      containers:
        - name: main
          image: busybox
          env:
            - name: M
              value: "{{MESAGE}}"
            - name: R
              value: "{{request_id}}"
            - name: W
              value: "{{ who }}"
      restartPolicy: Never
"""


def run_validate(root: Path) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = validate(SETTINGS, str(root), out=out)
    return code, out.getvalue().splitlines()


def write(root: Path, topics: list[dict[str, object]], files: dict[str, str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"topics": topics}, indent=2))
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_a_near_miss_of_a_built_in_or_a_declared_parameter_is_named_with_its_line(tmp_path: Path) -> None:
    root = write(tmp_path, [{"name": "scale", "configs": ["job.yaml"], "params": {"replicas": "1", "who": None}}],
                 {"job.yaml": JOB})
    code, lines = run_validate(root)
    assert code == 1
    assert "job.yaml:6: topic scale: {{replica}} is neither a built-in variable nor a parameter declared in " \
           "the topic's \"params\"; did you mean replicas?" in lines
    assert any(line.startswith("job.yaml:14: ") and line.endswith("did you mean MESSAGE?") for line in lines), lines
    assert any(line.startswith("job.yaml:16: ") and line.endswith("did you mean REQUEST_ID?") for line in lines), lines
    assert not any("who" in line for line in lines), "a parameter declared with null is intended"
    assert lines[-1].startswith("3 problem(s)")


def test_an_undeclared_parameter_is_a_warning_with_its_line_not_a_failure(tmp_path: Path) -> None:
    text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: c\ndata:\n  owner: '{{owner}}'\n"
    root = write(tmp_path, [{"name": "t", "configs": ["cm.yaml"]}], {"cm.yaml": text})
    code, lines = run_validate(root)
    assert code == 0, lines
    assert lines[0].startswith("warning: cm.yaml:6: topic t: {{owner}} is a parameter every message must give")
    assert 'declare it in "params" with a default, or null' in lines[0]

    write(tmp_path, [{"name": "t", "configs": ["cm.yaml"], "params": {"owner": "me"}}], {})
    code, lines = run_validate(root)
    assert code == 0 and not any(line.startswith("warning:") for line in lines), lines


def test_policy_problems_point_at_the_offending_key(tmp_path: Path) -> None:
    """At load (a written namespace) and after rendering (a namespace from a parameter default)."""
    written = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n  labels: {x: y}\n  namespace: kube-system\n"
    from_default = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: b\n\n  namespace: '{{ns}}'\n"
    banned = "apiVersion: v1\n# a comment\nkind: Secret\nmetadata:\n  name: s\n"
    code, lines = run_validate(write(tmp_path / "a", [{"name": "t", "configs": ["cm.yaml", "s.yaml"]}],
                                     {"cm.yaml": written, "s.yaml": banned}))
    assert code == 1
    assert any(line.startswith("cm.yaml:6: namespace 'kube-system' is not allowed") for line in lines), lines
    assert any(line.startswith("s.yaml:3: kind Secret is banned") for line in lines), lines

    code, lines = run_validate(write(tmp_path / "b", [{"name": "t", "configs": ["cm.yaml"],
                                                        "params": {"ns": "kube-system"}}], {"cm.yaml": from_default}))
    assert code == 1
    assert any(line.startswith("cm.yaml:6: topic t: ConfigMap b: namespace 'kube-system' is not allowed")
               for line in lines), lines


def test_line_lookup_survives_text_that_looks_like_its_own_placeholders() -> None:
    text = "a: gitfaasvariable99x\nb: '{{X}}'\n---\n---\nc:\n  - {{Y}}\n  - d: 1\n"
    lines = ManifestLines(text)
    assert lines.variable_line(0, "X", 0) == 2
    assert lines.variable_line(1, "Y", 0) == 6  # the empty document between is not counted
    assert lines.key_line(1, ("c", 1, "d"), 0) == 7
    assert lines.key_line(1, ("c", 5, "nothing"), 0) == 5  # the nearest key that is written
    assert ManifestLines("a: [unclosed\n").documents == []
