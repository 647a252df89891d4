"""Manifest rendering: what a function author writes in git and what reaches Kubernetes."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

import consumer.render
from consumer.render import (
    VARIABLE_PATTERN,
    CompiledDocument,
    MissingVariablesError,
    RenderError,
    TemplateError,
    compile_manifest,
)


def one(text: str) -> CompiledDocument:
    (document,) = compile_manifest(text, "functions/f/job.yaml")
    return document


def render(text: str, **values: str) -> dict[str, Any]:
    return one(text).render(values)


def test_plain_number_variable_becomes_an_integer() -> None:
    assert render("replicas: {{replicas}}\n", replicas="2") == {"replicas": 2}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2),
        ("-1", -1),
        ("0x1f", 31),
        ("1_000", 1000),
        ("3.5", 3.5),
        ("true", True),
        ("False", False),
        ("null", None),
        ("~", None),
        ("", None),
        ("2001-12-14", "2001-12-14"),  # timestamps stay text: JSON has no datetime
        ("<<", "<<"),
        ("=", "="),
        ("0x_", "0x_"),  # looks like hex to YAML's regex but has no digits
        ("2\n", "2\n"),
        (" 2", " 2"),
        ("yes please", "yes please"),
        ("abc", "abc"),
    ],
)
def test_plain_placement_is_typed_like_yaml_or_kept_as_exact_text(value: str, expected: object) -> None:
    result = render("a: {{v}}\n", v=value)["a"]
    assert result == expected
    assert type(result) is type(expected)


def test_quoted_number_stays_a_string() -> None:
    assert render("a: '{{v}}'\nb: \"{{v}}\"\n", v="2") == {"a": "2", "b": "2"}


def test_spaces_inside_braces_and_dotted_names() -> None:
    document = one("a: {{ body.file.name }}\nb: {{body.items.0}}\nc: {{\tx }}\n")
    assert document.variables == {"body.file.name", "body.items.0", "x"}
    assert document.render({"body.file.name": "f.csv", "body.items.0": "i", "x": "y"}) == {
        "a": "f.csv",
        "b": "i",
        "c": "y",
    }


def test_variable_pattern_matches_the_documented_names() -> None:
    assert VARIABLE_PATTERN.findall("{{a}} {{ b.c-d_0 }} {{0bad}} {{ }} {{a b}}") == ["a", "b.c-d_0"]


def test_variable_in_a_key() -> None:
    assert render("labels:\n  {{k}}: on\n  gitfaas/{{k}}: 'yes'\n", k="team") == {
        "labels": {"team": True, "gitfaas/team": "yes"}
    }


def test_key_with_variable_is_always_text() -> None:
    assert render("{{k}}: 1\n", k="2") == {"2": 1}


def test_variable_inside_a_longer_plain_scalar() -> None:
    assert render("name: job-{{RANDOM}}\n", RANDOM="abc") == {"name": "job-abc"}
    assert render("name: {{a}}{{b}}\n", a="1", b="2") == {"name": 12}


# --- injection battery -------------------------------------------------------------------------------

HOSTILE = [
    "a\nb: c",
    "x: y",
    "# c",
    "a # c",
    "- item",
    "{a: 1}",
    "[1]",
    "---\nkind: Secret",
    "...",
    "&a",
    "*a",
    "!!python/object:os.system",
    "'",
    '"',
    "\\",
    "\\n",
    "'\"\\\"'",
    "|",
    ">",
    "? k",
    "%YAML 1.1",
    "@x",
    "`x`",
    "{{x}}",
    "\u2028",
    "\u2029",
    "\u0085",
    "\x00",
    "\r\n",
    "\t",
    " lead",
    "trail ",
    "\ufeffbom",
    ("---\nkind: Secret\n- x\n# c: 'y\" {[&a *a !b |>%@`\u2028\x00\r\n" * 30_000)[:1_000_000],
]

TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: cm
data:
  before: b
  target: {placement}
  after: a
last: 1
"""

# placement in the template -> what `target` must hold for value v
PLACEMENTS = {
    "double-quoted": ('"{{v}}"', lambda v: v),
    "single-quoted": ("'{{v}}'", lambda v: v),
    "double-quoted-with-text": ('"<{{v}}>\\t"', lambda v: f"<{v}>\t"),
    "plain": ("{{v}}", lambda v: v),
    "plain-with-text": ("pre-{{ v }}-post", lambda v: f"pre-{v}-post"),
    "literal-block": ("|-\n    {{v}}", lambda v: v),
    "literal-block-keep-newline": ("|\n    x={{v}}", lambda v: f"x={v}\n"),
    "folded-block": (">-\n    {{v}}", lambda v: v),
    "flow-sequence": ("[first, {{v}}, last]", lambda v: ["first", v, "last"]),
    "flow-mapping": ("{k: {{v}}, z: 2}", lambda v: {"k": v, "z": 2}),
}


def shape(node: object) -> object:
    """The structure a reader of the manifest sees: keys and nesting, with scalars blanked."""
    if isinstance(node, dict):
        return {key: shape(value) for key, value in node.items()}
    if isinstance(node, list):
        return [shape(item) for item in node]
    return "scalar"


def value_id(value: str) -> str:
    return repr(value[:20]) + (f"...({len(value)} chars)" if len(value) > 20 else "")


@pytest.mark.parametrize("value", HOSTILE, ids=value_id)
@pytest.mark.parametrize("placement", PLACEMENTS, ids=str)
def test_hostile_value_only_changes_its_scalar(placement: str, value: str) -> None:
    written, expected = PLACEMENTS[placement]
    documents = compile_manifest(TEMPLATE.format(placement=written), "cm.yaml")
    assert len(documents) == 1
    rendered = documents[0].render({"v": value})
    benign = documents[0].render({"v": "benign"})

    assert shape(rendered) == shape(benign)
    assert rendered["data"]["target"] == expected(value)
    assert rendered["kind"] == "ConfigMap"
    assert list(rendered["data"]) == ["before", "target", "after"]
    json.dumps(rendered)


@pytest.mark.parametrize("value", HOSTILE, ids=value_id)
def test_hostile_value_in_a_key_is_exactly_that_key(value: str) -> None:
    document = one("data:\n  before: b\n  {{v}}: x\n  after: a\nkind: ConfigMap\n")
    rendered = document.render({"v": value})
    assert rendered == {"data": {"before": "b", value: "x", "after": "a"}, "kind": "ConfigMap"}


@pytest.mark.parametrize("value", HOSTILE, ids=value_id)
def test_hostile_value_as_sequence_item_stays_one_item(value: str) -> None:
    rendered = render("args:\n  - first\n  - {{v}}\n  - '{{v}}'\n  - last\n", v=value)
    assert rendered == {"args": ["first", value, value, "last"]}


# --- variables -------------------------------------------------------------------------------------


def test_missing_variables_are_all_named() -> None:
    document = one("a: {{zeta}}\nb: '{{alpha}}'\n{{key}}: x\nc: {{present}}\n")
    with pytest.raises(MissingVariablesError) as caught:
        document.render({"present": "1"})
    assert caught.value.names == ("alpha", "key", "zeta")
    assert str(caught.value) == "missing variables: alpha, key, zeta"


def test_empty_string_is_a_value_not_a_missing_variable() -> None:
    assert render("a: x{{v}}\nb: '{{v}}'\n", v="") == {"a": "x", "b": ""}


def test_variable_in_a_comment_is_not_required() -> None:
    document = one("# set {{unused}} some day\na: 1 # {{also_unused}}\n")
    assert document.variables == frozenset()
    assert document.render({}) == {"a": 1}


def test_non_string_value_is_rejected_with_its_name() -> None:
    with pytest.raises(RenderError, match="replicas"):
        one("replicas: {{replicas}}\n").render({"replicas": 2})  # type: ignore[dict-item]


def test_extra_values_are_ignored() -> None:
    assert render("a: {{x}}\n", x="1", other="2") == {"a": 1}


# --- keys ------------------------------------------------------------------------------------------


def test_substituted_key_colliding_with_a_sibling_is_an_error() -> None:
    document = one("metadata:\n  name: job\n  {{k}}: evil\n")
    with pytest.raises(RenderError, match="'name'") as caught:
        document.render({"k": "name"})
    assert "k" in str(caught.value)
    assert document.render({"k": "other"}) == {"metadata": {"name": "job", "other": "evil"}}


def test_two_substituted_keys_colliding_is_an_error() -> None:
    document = one("{{a}}: 1\n{{b}}: 2\n")
    with pytest.raises(RenderError):
        document.render({"a": "same", "b": "same"})
    assert document.render({"a": "x", "b": "y"}) == {"x": 1, "y": 2}


def test_substituted_key_colliding_with_a_non_string_key_as_json_spells_it() -> None:
    with pytest.raises(RenderError):
        one("1: a\n{{k}}: b\n").render({"k": "1"})


def test_duplicate_static_key_is_a_template_error() -> None:
    with pytest.raises(TemplateError, match="duplicate key 'a'") as caught:
        compile_manifest("x: 0\na: 1\na: 2\n", "dup.yaml")
    assert caught.value.source == "dup.yaml"
    assert caught.value.line == 3


# --- documents -------------------------------------------------------------------------------------

MULTI = """\
# header
---
apiVersion: v1
kind: ConfigMap
metadata: {name: "{{a}}"}
---
# only a comment
---
---
apiVersion: v1
kind: Secret
metadata:
  name: s-{{b}}
"""


def test_multi_document_file() -> None:
    documents = compile_manifest(MULTI, "multi.yaml")
    assert [(d.source, d.index, d.line) for d in documents] == [("multi.yaml", 0, 3), ("multi.yaml", 1, 10)]
    assert [d.variables for d in documents] == [{"a"}, {"b"}]
    assert documents[0].render({"a": "x"})["metadata"] == {"name": "x"}
    assert documents[1].render({"b": "y"})["metadata"] == {"name": "s-y"}


def test_a_value_cannot_add_a_document() -> None:
    documents = compile_manifest("kind: A\nv: {{v}}\n", "a.yaml")
    assert len(documents) == 1
    value = "x\n---\nkind: Secret\n"
    assert documents[0].render({"v": value}) == {"kind": "A", "v": value}


def test_empty_file_has_no_documents() -> None:
    assert compile_manifest("", "e.yaml") == []
    assert compile_manifest("# nothing\n---\n---\n", "e.yaml") == []


@pytest.mark.parametrize(
    ("text", "line"),
    [("kind: A\n---\n- a\n- b\n", 3), ("---\n{{x}}\n", 2), ("just text\n", 1)],
)
def test_document_that_is_not_a_mapping_is_a_template_error(text: str, line: int) -> None:
    with pytest.raises(TemplateError) as caught:
        compile_manifest(text, "bad.yaml")
    assert (caught.value.source, caught.value.line) == ("bad.yaml", line)
    assert str(caught.value).startswith(f"bad.yaml:{line}: ")


def test_bad_yaml_names_file_line_and_shows_variables_as_written() -> None:
    with pytest.raises(TemplateError) as caught:
        compile_manifest("a: 1\nb: *{{x}}\n", "bad.yaml")
    assert caught.value.line == 2
    assert "{{x}}" in str(caught.value)
    assert "gfv" not in str(caught.value)
    with pytest.raises(TemplateError, match=r"^bad\.yaml:3: "):
        compile_manifest("a: 1\nb: [1\nc: 2\n", "bad.yaml")


@pytest.mark.parametrize(
    "text",
    ["a: !{{t}} x\n", "a: !!int {{x}}\n", "a: &{{x}} 1\n", "a: !custom 1\n", "a: !!set {b}\n"],
)
def test_variables_in_tags_or_anchors_and_unknown_tags_are_template_errors(text: str) -> None:
    with pytest.raises(TemplateError):
        compile_manifest(text, "t.yaml")


# --- what comes out ----------------------------------------------------------------------------------

JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: job-{{id}}
  labels: {app: resize}
  annotations:
    created: 2001-12-14
    at: 2001-12-14t21:59:43.10-05:00
spec:
  template:
    spec:
      containers:
        - name: main
          image: busybox
          args: ["{{file}}", --flag]
          env:
            - {name: A, value: "1"}
      data: !!binary aGVsbG8=
"""


def test_output_is_json_serializable_including_static_timestamps() -> None:
    rendered = render(JOB, id="1", file="2001-12-14")
    assert rendered["metadata"]["annotations"] == {
        "created": "2001-12-14",
        "at": "2001-12-14t21:59:43.10-05:00",
    }
    assert rendered["spec"]["template"]["spec"]["data"] == "aGVsbG8="
    assert json.loads(json.dumps(rendered)) == rendered


def test_renders_are_independent_objects() -> None:
    document = one(JOB)
    first = document.render({"id": "1", "file": "f"})
    expected = json.loads(json.dumps(first))
    first["metadata"]["labels"]["gitfaas/run"] = "x"
    first["metadata"]["annotations"].clear()
    container = first["spec"]["template"]["spec"]["containers"][0]
    container["args"].append("--more")
    container["env"][0]["value"] = "changed"
    first["spec"]["template"]["spec"]["containers"].append({})
    assert document.render({"id": "1", "file": "f"}) == expected


def test_anchors_and_aliases() -> None:
    template = """\
base: &base
  image: "img:{{tag}}"
  pull: IfNotPresent
containers:
  - <<: *base
    name: a
  - <<: *base
    name: b
    pull: Always
same: *base
"""
    rendered = render(template, tag="1.2")
    assert rendered == {
        "base": {"image": "img:1.2", "pull": "IfNotPresent"},
        "containers": [
            {"image": "img:1.2", "pull": "IfNotPresent", "name": "a"},
            {"image": "img:1.2", "pull": "Always", "name": "b"},
        ],
        "same": {"image": "img:1.2", "pull": "IfNotPresent"},
    }
    rendered["same"]["image"] = "changed"
    assert rendered["base"]["image"] == "img:1.2"


def test_explicit_keys_override_merged_ones_wherever_the_variable_is() -> None:
    document = one("b: &b {x: '{{gone}}', y: 1}\nm:\n  x: 2\n  <<: *b\n  y: '{{v}}'\n")
    assert document.render({"v": "3", "gone": "g"})["m"] == {"x": 2, "y": "3"}
    assert one("m: {x: 2, <<: {x: '{{gone}}'}}\n").variables == frozenset()


def test_substituted_key_cannot_hide_a_merged_key() -> None:
    document = one("base: &b {x: 1}\nm:\n  <<: *b\n  {{k}}: 2\n")
    assert document.render({"k": "y"})["m"] == {"x": 1, "y": 2}
    with pytest.raises(RenderError):
        document.render({"k": "x"})


def test_sample_shows_variables_as_written() -> None:
    sample = one(JOB).sample()
    assert sample["kind"] == "Job"
    assert sample["metadata"]["name"] == "job-{{id}}"
    assert sample["spec"]["template"]["spec"]["containers"][0]["args"] == ["{{file}}", "--flag"]


def test_pure_python_loader_renders_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C loader is optional (PyYAML without libyaml); the fallback must behave identically."""
    cases = [(JOB, {"id": "2", "file": "a\nb: c"})] + [
        (TEMPLATE.format(placement=written), {"v": value})
        for written, _ in PLACEMENTS.values()
        for value in ("2", "true", "", "x: y", "- a\n- b", "\u2028")
    ]
    fast = [one(text).render(values) for text, values in cases]
    monkeypatch.setattr(consumer.render, "_BaseLoader", yaml.SafeLoader)
    assert [one(text).render(values) for text, values in cases] == fast
