"""Issue 12: a file of many documents compiles, validates and renders each document as YAML reads it.

The compiler once memoised compiled nodes by `id(node)` for a whole file; once a document's nodes
were freed, a later document's nodes could get the same ids and be handed another node's result.
Here every document is compared, after compiling, validating and rendering through the consumer's
own code path, with what PyYAML's `safe_load_all` gives for the same text with the values typed in.

The property test generates files of 1-200 Jobs, ConfigMaps and Deployments with anchors, aliases,
merge keys (`<<`) and variables in keys and values, and puts the allocator under pressure between
documents (collections, bursts of freed or kept objects) so that reused ids are likely.
"""

from __future__ import annotations

import gc
import io
import json
import random
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cli import authoring
from cli.authoring import sample_problems
from consumer import render
from consumer.configuration import Configuration, load_configuration
from consumer.documents import Request, render_request
from consumer.prepare import ANNOTATION_COMMIT, Stamp, prepare
from consumer.render import VARIABLE_PATTERN
from consumer.variables import MessageValues
from gitfaas.settings import Settings

SETTINGS = Settings(kube_namespace="default", nats_url="nats://127.0.0.1:4222", bridge_url="http://bridge")
TOPIC = "fan"
# PyYAML's own reading, as fast as it comes (the C loader has the same semantics as yaml.SafeLoader).
_SafeLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_TIMESTAMP = re.compile(r"[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}")  # kept as text by gitfaas, a date for PyYAML
VARIABLES = [f"v{index}" for index in range(6)]


def safe_load_all(text: str) -> list[Any]:
    return [document for document in yaml.load_all(text, Loader=_SafeLoader) if document is not None]


def substituted(text: str, values: dict[str, str]) -> str:
    return VARIABLE_PATTERN.sub(lambda match: values[match[1]], text)


def write_repository(root: Path, text: str) -> None:
    (root / "config.json").write_text(json.dumps({"topics": [{"name": TOPIC, "configs": ["many.yaml"]}]}))
    (root / "many.yaml").write_text(text)


def request(values: dict[str, str]) -> Request:
    return Request(topic=TOPIC, request_id="req-12", identity="identity-12", stream_seq=7, body=b"{}",
                   params=values)


def stamped(documents: list[Any], commit: str) -> list[dict[str, Any]]:
    """What the consumer must apply: the documents as PyYAML reads them, stamped like rendered ones."""
    stamp = Stamp(topic=TOPIC, request_id="req-12", stream_seq=7, commit=commit, identity="identity-12")
    return [prepare(document, ordinal=ordinal, stamp=stamp, namespace=SETTINGS.kube_namespace, settings=SETTINGS)
            for ordinal, document in enumerate(documents)]


def check_file(text: str, values: dict[str, str], root: Path) -> Configuration:
    """Load and validate as `gitfaas validate` does, render as the consumer does: PyYAML's documents, each."""
    expected = safe_load_all(substituted(text, values))
    write_repository(root, text)
    config = load_configuration(root, "c" * 40, SETTINGS)  # raises ConfigurationError listing any problem
    documents = config.topics[TOPIC].documents
    assert len(documents) == len(expected)
    for document, wanted in zip(documents, expected, strict=True):
        assert document.render(values) == wanted, f"document {document.index} (line {document.line})"
    assert sample_problems(SETTINGS, config, kubernetes=False) == []  # generated documents: no schema
    assert render_request(SETTINGS, config, request(values)) == stamped(expected, config.commit)
    return config


# --- generated files ---------------------------------------------------------------------------

values_strategy = st.one_of(
    st.sampled_from(["123", "-7", "0", "1.5", "true", "no", "on", "null", "~", "0x1f", "0b101", "abc", "x-y.z"]),
    st.from_regex(r"[a-z0-9][a-z0-9.-]{0,11}", fullmatch=True).filter(lambda v: not _TIMESTAMP.match(v)),
)
LITERAL_KEYS = ["name", "app", "tier", "image", "value", "port", "mode", "x-1", "k.y", "path", "team"]
STATIC_SCALARS = ["plain", "42", "-3", "1.5", "true", "off", "null", "~", "'single quoted'", '"double: quoted"',
                  "hello world", "0o17", "'{not a variable}'", '""', "|-\n  block\n  text"]


class Document:
    """Writes one document in text order, so an alias only ever names an anchor already complete.

    Anchor names restart in every document (`a0`, `a1`...): the same names, other nodes, as YAML allows.
    Key variables get a prefix unique in the file (`q<n>-`), so no substituted key can meet another.
    """

    def __init__(self, rng: random.Random, keys: Iterator[int]) -> None:
        self.rng = rng  # seeded by hypothesis: a document is a function of its seed, drawn in one go
        self.keys = keys
        self.anchors = 0
        self.complete: list[tuple[str, str]] = []  # (anchor, "scalar" | "map" | "seq"), defined and closed
        # Map anchors without merges of their own, with their keys. Sources merged together have no key
        # in common: for `<<: [*a, *b]` YAML says *a's key wins, PyYAML 6.0.4 takes *b's (gitfaas: *a's).
        self.mergeable: dict[str, set[str]] = {}

    def variable(self) -> str:
        name = self.rng.choice(VARIABLES)
        return self.rng.choice(["{{%s}}", "{{ %s }}"]) % name

    def scalar(self, block: bool = True) -> str:
        """Source text of a scalar; `block=False` for flow context (no bare plain variable there)."""
        forms = ["static", "double", "single", "text", "two"] + (["bare"] if block else [])
        form = self.rng.choice(forms)
        if form == "static":
            text = self.rng.choice(STATIC_SCALARS if block else STATIC_SCALARS[:-1])
            return text
        if form == "double":
            return f'"{self.variable()}"'
        if form == "single":
            return f"'{self.variable()}'"
        if form == "text":
            return f"pre-{self.variable()}-post"
        if form == "two":
            return f'"{self.variable()}/{self.variable()}"'
        return self.variable()

    def scalar_lines(self, indent: int, head: str = "") -> list[str]:
        """A scalar completing `key:` at `indent` (a block scalar's lines indented under the key)."""
        first, *rest = self.scalar().split("\n")
        return [f"{head} {first}"] + [" " * (indent + 2) + line.strip() for line in rest]

    def key(self) -> str:
        if self.rng.randint(0, 3) == 0:
            quote = self.rng.choice(["", '"', "'"])
            return f"{quote}q{next(self.keys)}-{self.variable()}{quote}"
        return self.rng.choice(LITERAL_KEYS)

    def anchor(self) -> str | None:
        if self.rng.randint(0, 2) == 0:
            self.anchors += 1
            return f"a{self.anchors - 1}"
        return None

    def alias(self, kinds: tuple[str, ...]) -> str | None:
        choices = [name for name, kind in self.complete if kind in kinds]
        if choices and self.rng.randint(0, 3) == 0:
            return "*" + self.rng.choice(choices)
        return None

    def value(self, indent: int, depth: int) -> list[str]:
        """Lines completing `key:` (first line is what follows the colon)."""
        alias = self.alias(("scalar", "map", "seq"))
        if alias:
            return [f" {alias}"]
        kind = self.rng.choice(["scalar", "scalar", "map", "seq"] if depth < 3 else ["scalar"])
        if kind == "scalar":
            anchor = self.anchor()
            lines = self.scalar_lines(indent, f" &{anchor}" if anchor else "")
            if anchor:
                self.complete.append((anchor, "scalar"))
            return lines
        if kind == "map":
            return self.mapping(indent + 2, depth + 1, self.rng.randint(0, 4))
        return self.sequence(indent + 2, depth + 1)

    def mapping(self, indent: int, depth: int, size: int,
                fixed: tuple[tuple[str, Callable[[], list[str]]], ...] = ()) -> list[str]:
        """Lines of a block mapping at `indent`, the first being what follows the parent's colon.

        `fixed` entries come first; their values are drawn in text order, after this mapping's merges.
        """
        anchor = self.anchor()
        pad = " " * indent
        merges: list[str] = []
        for name, keys in self.mergeable.items():
            if len(merges) < 2 and self.rng.randint(0, 3) == 0 and not keys & set().union(
                    *(self.mergeable[other] for other in merges)):
                merges.append(name)
        lines = [f" &{anchor}" if anchor else ""]
        if not size and not merges and not fixed:
            lines = [f"{lines[0]} {{}}"]
        if merges:
            aliases = [f"*{name}" for name in merges]
            lines.append(f"{pad}<<: " + (aliases[0] if len(aliases) == 1 else "[" + ", ".join(aliases) + "]"))
        used: set[str] = set()
        for key, draw_value in fixed:
            used.add(key)
            value_lines = draw_value()
            lines.append(f"{pad}{key}:{value_lines[0]}")
            lines.extend(value_lines[1:])
        for _ in range(size):
            key = self.key()
            if key in used:
                continue
            used.add(key)
            value = self.value(indent, depth)
            lines.append(f"{pad}{key}:{value[0]}")
            lines.extend(value[1:])
        if anchor:
            self.complete.append((anchor, "map"))
            if not merges:
                self.mergeable[anchor] = used
        return lines

    def sequence(self, indent: int, depth: int) -> list[str]:
        anchor = self.anchor()
        size = self.rng.randint(0, 3)
        head = f" &{anchor}" if anchor else ""
        if not size:
            lines = [f"{head} []"]
        elif self.rng.random() < 0.5:  # flow: only quoted or static items
            lines = [f"{head} [" + ", ".join(self.scalar(block=False) for _ in range(size)) + "]"]
        else:
            pad = " " * indent
            lines = [head]
            for _ in range(size):
                item = self.value(indent, depth)
                lines.append(f"{pad}-{item[0]}")
                lines.extend(item[1:])
        if anchor:
            self.complete.append((anchor, "seq"))
        return lines

    def labels(self, indent: int) -> list[str]:
        alias = self.alias(("map",))
        return [f" {alias}"] if alias else self.mapping(indent, 3, self.rng.randint(0, 3))

    def name(self, prefix: str, index: int) -> str:
        form = self.rng.choice(["literal", "literal", "variable", "quoted"])
        if form == "variable":
            return f"{prefix}-{index}-{self.variable()}"
        return f"{prefix}-{index}" if form == "literal" else f'"{prefix}-{index}"'

    def job(self, index: int) -> str:
        lines = ["apiVersion: batch/v1", "kind: Job", "metadata:", f"  name: {self.name('job', index)}"]
        lines += ["  labels:" + (label := self.labels(4))[0], *label[1:]]
        lines += ["spec:", f"  backoffLimit: {self.rng.randint(0, 3)}", "  template:", "    metadata:"]
        lines += ["      labels:" + (label := self.labels(8))[0], *label[1:]]
        lines += ["    spec:", "      restartPolicy: Never", "      containers:"]
        for number in range(self.rng.randint(1, 3)):
            body = self.mapping(10, 2, self.rng.randint(0, 2), fixed=(
                ("name", lambda number=number: [f" c{number}"]),
                ("image", lambda: self.scalar_lines(10)),
                ("command", lambda: [f' ["sh", "-c", "echo {self.variable()}"]']),
                ("env", lambda: self.sequence(10, 2)),
            ))
            lines.append(f"        -{body[0]}")
            lines.extend(body[1:])
        return "\n".join(lines)

    def config_map(self, index: int) -> str:
        lines = ["apiVersion: v1", "kind: ConfigMap", "metadata:", f"  name: {self.name('cm', index)}"]
        if self.rng.random() < 0.5:
            lines.append("  namespace: default")
        lines += ["data:" + (data := self.mapping(2, 1, self.rng.randint(0, 5)))[0], *data[1:]]
        return "\n".join(lines)

    def deployment(self, index: int) -> str:
        lines = ["apiVersion: apps/v1", "kind: Deployment", "metadata:", f"  name: {self.name('deploy', index)}"]
        lines += ["spec:", f"  replicas: {self.rng.randint(0, 3)}", "  selector:"]
        lines += ["    matchLabels:" + (label := self.labels(6))[0], *label[1:]]
        lines += ["  template:", "    metadata:"]
        lines += ["      labels:" + (label := self.labels(8))[0], *label[1:]]
        lines += ["    spec:", "      containers:"]
        body = self.mapping(10, 2, self.rng.randint(0, 3),
                            fixed=(("name", lambda: [" web"]), ("image", lambda: self.scalar_lines(10))))
        lines.append(f"        -{body[0]}")
        lines.extend(body[1:])
        return "\n".join(lines)


@st.composite
def manifest_files(draw: st.DrawFn, max_documents: int = 200) -> str:
    keys = iter(range(1_000_000))
    parts = []
    for index in range(draw(st.integers(1, max_documents))):
        document = Document(random.Random(draw(st.integers(0, 2**32))), keys)
        kind = draw(st.sampled_from([document.job, document.config_map, document.deployment]))
        parts.append(kind(index))
    separators = ["---\n", "---\n# a comment\n", "\n---\n", "--- \n"]
    text = parts[0] + "\n"
    for part in parts[1:]:
        text += draw(st.sampled_from(separators)) + part + "\n"
    return ("---\n" if draw(st.booleans()) else "") + text


# How the allocator is disturbed after each document is composed: freed objects make room that the
# next document's nodes may take, kept ones shift which room that is.
PRESSURES = ["none", "collect", "churn", "keep"]


def pressured(pattern: list[str]) -> Any:
    real = render._compose_all
    kept: list[Any] = []

    def compose_all(text: str, loader_class: type) -> Iterator[yaml.Node]:
        for number, node in enumerate(real(text, loader_class)):
            yield node
            step = pattern[number % len(pattern)]
            if step == "collect":
                gc.collect(0)  # the youngest generation: a full collection costs ~20 ms next to hypothesis
            elif step == "churn":
                junk = [yaml.ScalarNode("tag:yaml.org,2002:str", str(i)) for i in range(64)]
                junk += [yaml.MappingNode("tag:yaml.org,2002:map", []) for _ in range(64)]
                del junk
            elif step == "keep":
                kept.append([yaml.SequenceNode("tag:yaml.org,2002:seq", []) for _ in range(16)])
    return compose_all


# No shrinking: a failure that depends on the allocator does not reproduce reliably enough to shrink (on
# the old compiler hypothesis spent its five-minute budget trying); the message names the document.
PROPERTY = settings(max_examples=40, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@PROPERTY
@given(text=manifest_files(), values=st.fixed_dictionaries({name: values_strategy for name in VARIABLES}),
       pattern=st.lists(st.sampled_from(PRESSURES), min_size=1, max_size=5))
def test_every_document_compiles_validates_and_renders_as_yaml_reads_it(
        text: str, values: dict[str, str], pattern: list[str]) -> None:
    with mock.patch.object(render, "_compose_all", pressured(pattern)), tempfile.TemporaryDirectory() as root:
        check_file(text, values, Path(root))


# --- the files of the issue, run 50 times in one process ------------------------------------------

JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: fanout-{index}
  labels:
    part: "{index}"
    run: "{{{{RANDOM}}}}"
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: part-{index}
          image: busybox:1.36
          command: ["sh", "-c", "echo part {index} of $MESSAGE"]
          env:
            - name: MESSAGE
              value: "{{{{MESSAGE}}}}"
            - name: REQUEST_ID
              value: "{{{{REQUEST_ID}}}}"
            - name: FUNCTION_UID
              value: "{{{{ FUNCTION_UID }}}}"
            - name: BRIDGE_URL
              value: "{{{{BRIDGE_URL}}}}"
"""
# Small documents for the 500-document file (50 runs of it must stay quick), each still with a literal
# name, variables (one that differs per document), anchors, aliases or merge keys.
SMALL_JOB = """\
apiVersion: batch/v1
kind: Job
metadata: {{name: job-{index}}}
spec: {{template: {{spec: {{containers: [{{name: main, env: [{{name: UID, value: "{{{{FUNCTION_UID}}}}"}}]}}]}}}}}}
"""
CONFIG_MAP = """\
apiVersion: v1
kind: ConfigMap
metadata: {{name: settings-{index}}}
data:
  greeting: &greeting "hello {{{{v0}}}}"
  again: *greeting
  key-{{{{v1}}}}: {{{{v2}}}}
"""
DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata: {{name: web-{index}, labels: &labels {{app: web-{index}}}}}
spec:
  selector: {{matchLabels: *labels}}
  template: {{metadata: {{labels: {{<<: *labels, tier: "{{{{v3}}}}"}}}}}}
"""
RUNS = 50
BODY = b'{"rows": 12}'


def ten_jobs() -> list[str]:
    """The file of the issue: ten Jobs, each with a literal metadata.name."""
    return [JOB.format(index=index) for index in range(10)]


def five_hundred_documents() -> list[str]:
    """Jobs, ConfigMaps (anchor, alias, variable key) and Deployments (merge keys), by turns; small ones."""
    templates = [SMALL_JOB, CONFIG_MAP, DEPLOYMENT]
    return [templates[index % 3].format(index=index) for index in range(500)]


def expected_per_document(documents: list[str], params: dict[str, str]) -> list[Any]:
    """PyYAML's reading of each document with the values the consumer gives that document (by position)."""
    values = MessageValues(request_id="req-12", identity="identity-12", topic=TOPIC, body=BODY, params=params,
                           nats_url="unused", bridge_url=SETTINGS.bridge_url)
    expected = []
    for ordinal, text in enumerate(documents):
        names = {match[1] for match in VARIABLE_PATTERN.finditer(text)}
        (document,) = yaml.safe_load_all(substituted(text, {name: values.value(name, ordinal) for name in names}))
        expected.append(document)
    return expected


@pytest.mark.parametrize("make", [ten_jobs, five_hundred_documents], ids=["ten-jobs", "500-documents"])
def test_a_multi_document_file_validates_and_renders_the_same_on_every_run(make: Any, tmp_path: Path) -> None:
    documents = make()
    write_repository(tmp_path, "---\n".join(documents))
    params = {name: f"value-{name}" for name in VARIABLES}
    the_request = Request(topic=TOPIC, request_id="req-12", identity="identity-12", stream_seq=7, body=BODY,
                          params=params)
    expected = expected_per_document(documents, params)
    names = [document["metadata"]["name"] for document in expected]
    assert len(set(names)) == len(documents) and names[:3] == (
        ["fanout-0", "fanout-1", "fanout-2"] if make is ten_jobs else ["job-0", "settings-1", "web-2"])
    applied = stamped(expected, "")  # the commit is a hash of the files: filled in below

    reports: set[str] = set()
    for run in range(RUNS):
        out = io.StringIO()
        # `gitfaas validate` (without the Kubernetes schemas: these small documents are not whole objects)
        assert authoring.validate(SETTINGS, str(tmp_path), out=out, kubernetes=False) == 0, out.getvalue()
        reports.add(out.getvalue())
        config = authoring.load(SETTINGS, str(tmp_path))  # as `gitfaas render` loads (the consumer's loader)
        for document in applied:
            document["metadata"]["annotations"][ANNOTATION_COMMIT] = config.commit
        assert render_request(SETTINGS, config, the_request) == applied, f"run {run}"
    (report,) = reports
    assert f"ok: 1 topic(s), {len(documents)} document(s) in {tmp_path}\n" in report, report
