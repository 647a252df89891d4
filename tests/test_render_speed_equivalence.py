"""B5's speed-ups change nothing a message gets: each is checked against the plain construction it replaced.

`random_token` makes two base-36 digits per division; the consumer works out NATS_URL, the allowed
namespaces and the lowered BANNED_KINDS once per Settings instead of once per message; a Job's two
label stamps come from one dict. Settings objects used one after the other must each get their own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from pathlib import Path

import pytest

from consumer.configuration import load_configuration
from consumer.documents import Request, render_request
from consumer.errors import PermanentError
from consumer.prepare import Stamp, kind_refused, prepare
from consumer.variables import MessageValues, random_token
from gitfaas.natsconn import display_servers
from gitfaas.settings import Settings

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"


def reference_token(identity: str, ordinal: int, length: int = 10) -> str:
    """`random_token` as it was first written: one base-36 digit per division."""
    number = int.from_bytes(hashlib.sha256(f"{identity}\0{ordinal}".encode()).digest()[:12], "big")
    chars = []
    for _ in range(length):
        number, digit = divmod(number, 36)
        chars.append(_ALPHABET[digit])
    return "".join(chars)


def test_random_token_is_the_digit_by_digit_token():
    rng = random.Random(12)
    for length in range(0, 41):  # past 19 digits the 96 bits are used up: zeros, as before
        for _ in range(200):
            identity = f"{rng.getrandbits(128):032x}|{rng.randrange(10**6)}|2026-01-01T00:00:00+00:00"
            ordinal = rng.randrange(50)
            assert random_token(identity, ordinal, length) == reference_token(identity, ordinal, length)
    assert random_token("x", 0) == reference_token("x", 0)  # the default length


@pytest.mark.parametrize("body", [b"", b"a", b"ab", b"abc", bytes(range(256)), b"{}" * 700])
def test_message_is_the_base64_of_the_body(body):
    values = MessageValues(request_id="r", identity="i", topic="t", body=body, params={}, nats_url="n",
                           bridge_url="b")
    assert values.value("MESSAGE", 0) == values.value("PAYLOAD", 0) == base64.b64encode(body).decode("ascii")


MANIFEST = """\
apiVersion: batch/v1
kind: "{{ kind }}"
metadata:
  name: job-{{ RANDOM }}
  namespace: "{{ ns }}"
  labels: {team: a}
spec:
  template:
    spec:
      containers:
        - name: c
          image: busybox
          env:
            - {name: NATS_URL, value: "{{ NATS_URL }}"}
"""


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"topics": [{"name": "t", "configs": ["job.yaml"]}]}))
    (tmp_path / "job.yaml").write_text(MANIFEST)
    return tmp_path


def rendered(settings: Settings, root: Path, **params: str) -> dict:
    config = load_configuration(root, "c" * 40, settings)
    request = Request(topic="t", request_id="req-1", identity="req-1|1|x", stream_seq=1, body=b"{}",
                      params={"kind": "Job", "ns": "default", **params})
    [document] = render_request(settings, config, request)
    return document


def test_each_settings_gets_its_own_nats_url_namespaces_and_banned_kinds(repository):
    first = Settings(kube_namespace="default", nats_url="nats://user:secret@one:4222,nats://two:4223",
                     allowed_namespaces=("default", "team-a"), banned_kinds=("Job",))
    second = Settings(kube_namespace="default", function_nats_url="nats://functions:4222",
                      allowed_namespaces=("default",), banned_kinds=("Secret",))
    for _ in range(3):  # alternating: nothing of one may stick for the other
        document = rendered(first, repository, kind="CronJob", ns="team-a")
        env = document["spec"]["template"]["spec"]["containers"][0]["env"]
        assert env == [{"name": "NATS_URL", "value": "nats://one:4222,nats://two:4223"}]
        assert env[0]["value"] == display_servers(first, separator=",")
        assert document["metadata"]["namespace"] == "team-a"
        with pytest.raises(PermanentError, match="kind Job is banned"):
            rendered(first, repository)

        document = rendered(second, repository)
        env = document["spec"]["template"]["spec"]["containers"][0]["env"]
        assert env == [{"name": "NATS_URL", "value": "nats://functions:4222"}]
        with pytest.raises(PermanentError, match="namespace 'team-a' is not allowed"):
            rendered(second, repository, ns="team-a")
        with pytest.raises(PermanentError, match="kind secretlist is refused"):
            rendered(second, repository, kind="secretlist")


def test_kind_refused_follows_the_settings():
    assert kind_refused("secret", Settings(banned_kinds=("Secret",))) is not None
    assert kind_refused("secret", Settings(banned_kinds=("ConfigMap",))) is None
    assert kind_refused("Secret", Settings(banned_kinds=("Secret",))) is not None


def test_a_jobs_labels_are_equal_but_not_shared():
    stamp = Stamp(topic="t", request_id="req-1", stream_seq=1, commit="c" * 40, identity="i")
    document = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j", "labels": {"a": 1}},
                "spec": {"template": {"spec": {}}}}
    prepare(document, ordinal=0, stamp=stamp, namespace="default", settings=Settings(kube_namespace="default"))
    labels = document["metadata"]["labels"]
    pod_labels = document["spec"]["template"]["metadata"]["labels"]
    assert labels == {"a": "1", **stamp.labels()}
    assert pod_labels == stamp.labels()
    assert labels is not pod_labels
    pod_labels["x"] = "y"
    assert "x" not in labels


# --- generated render code (render._generate) against the builder tree it stands for -----------

KEYS_AND_TYPES = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: x}
data:
  1: a
  true: b
  1.0: c
  null: d
  -0.0: e
  0.0: f
  .nan: n
  base: &base {x: 1, y: "{{ v }}"}
  m:
    <<: *base
    y: 2
    z: '{{ v }}-{{ w }}'
  l: [1, "{{ v }}", {{ v }}, x{{ v }}y, .inf, -.inf, 2001-01-01, !!binary aGVsbG8=, {}, [], *base, *base]
  keyed:
    "{{ w }}": 5
    fixed: {{ v }}
"""
DEEP = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata: " + "{a: " * 96 + "[{{ v }}, '{{ w }}']"
        + "}" * 96 + "\n")
ALIASES = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n  a: &a [" + ", ".join(["{{ v }}"] * 10)
           + "]\n  b: &b [" + ", ".join(["*a"] * 10) + "]\n  c: [" + ", ".join(["*b"] * 10) + "]\n")


def spelled(value: object) -> str:
    return repr(value) + json.dumps(value)  # types, key order, NaN and -0.0 included


@pytest.mark.parametrize("text", [KEYS_AND_TYPES, DEEP, ALIASES], ids=["keys-and-types", "deep", "aliases"])
@pytest.mark.parametrize("values", [{"v": "on", "w": "k"}, {"v": "0x1f", "w": "y"}, {"v": "a: b", "w": "{{x}}"},
                                    {"v": "", "w": ""}, {"v": "2001-01-01", "w": "-1"}])
def test_the_generated_code_builds_what_the_builder_tree_builds(text, values):
    from consumer.render import compile_manifest

    [document] = compile_manifest(text, "t.yaml")
    assert document._fast is not None
    fast, tree = document.render(values), document._build(values)
    assert spelled(fast) == spelled(tree)
    again = document.render(values)
    assert spelled(again) == spelled(fast)
    assert again["data"] is not fast["data"]  # fresh containers on every render


def test_containers_are_never_shared_within_or_across_renders():
    from consumer.render import compile_manifest

    [document] = compile_manifest(ALIASES, "t.yaml")
    first, second = document.render({"v": "1"}), document.render({"v": "1"})
    assert first["data"]["c"][0] is not first["data"]["c"][1]
    assert first["data"]["c"][0][0] is not first["data"]["c"][0][1]
    assert first["data"]["a"] is not second["data"]["a"]


def test_a_key_collision_is_refused_by_the_generated_code_too():
    from consumer.render import RenderError, compile_manifest

    [document] = compile_manifest(KEYS_AND_TYPES, "t.yaml")
    with pytest.raises(RenderError, match="collides"):
        document.render({"v": "1", "w": "fixed"})


def test_a_very_large_document_keeps_the_builder_tree():
    from consumer.render import MAX_GENERATED_NODES, compile_manifest

    text = ("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n"
            + "".join(f"  k{i}: {'{{ v }}' if i % 7 == 0 else i}\n" for i in range(MAX_GENERATED_NODES + 10)))
    [document] = compile_manifest(text, "t.yaml")
    assert document._fast is None
    assert document.render({"v": "x"})["data"]["k7"] == "x"


def test_generated_code_per_file_is_bounded_and_the_rest_renders_the_same() -> None:
    """A file at the size limits does not pay for generating code for all its documents (load time):
    past MAX_GENERATED_NODES_PER_FILE the documents keep the tree, and render the same."""
    from consumer import render as render_module

    def doc(i: int) -> str:
        return (f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c{i}}}\ndata:\n"
                + "".join(f"  k{j}: '{{{{ MESSAGE }}}}-{j}'\n" for j in range(50)))

    documents = render_module.compile_manifest("---\n".join(doc(i) for i in range(300)), "many.yaml")
    generated = [d for d in documents if d._fast is not None]
    assert 0 < len(generated) < len(documents)
    per_document = render_module.MAX_GENERATED_NODES_PER_FILE // len(generated)
    assert per_document >= 50  # each generated one is one of these documents, not a sliver of one
    values = {"MESSAGE": "m"}
    for document in (generated[-1], documents[-1]):
        assert document.render(values) == document._build(values)
