"""Property tests of §4: for any value, in any placement, the rendered document keeps exactly the
template's key paths, and a quoted or block placement gives back exactly the value.

tests/test_render.py checks a fixed list of hostile values; here hypothesis searches for others, mixing
YAML's indicator characters, line breaks of every kind, NUL, BOM, sentinel look-alikes and arbitrary
Unicode, short and up to 1 MB long.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from consumer.render import compile_manifest

NASTY = [
    "\n", "\r", "\r\n", "\u2028", "\u2029", "\u0085", "\x00", "\t", " ", "\ufeff", "\x1b",
    ": ", ":", "#", " #", "- ", "-", "? ", "{", "}", "[", "]", ",", "---", "...", "--- |", "&a", "*a",
    "!!python/object/apply:os.system", "!", "!!binary", "'", "''", '"', "\\", "\\n", "|", ">", "|-", "%YAML",
    "@", "`", "<<", "=", "~", "null", "true", "no", "0x1f", "0o7", "1e3", ".inf", ".nan", "1:20", "2001-12-14",
    "{{v}}", "{{ x }}", "gfv0n0z", "kind: Secret", "\n  extra: key", "\n- item", "\n---\nkind: Secret\n",
]

pieces = st.one_of(st.sampled_from(NASTY), st.text(max_size=4))
values = st.one_of(st.text(), st.lists(pieces, max_size=24).map("".join))
huge_values = st.builds(
    lambda unit, count: (unit * count)[:1_000_000],
    st.lists(st.sampled_from(NASTY), min_size=1, max_size=6).map("".join),
    st.integers(min_value=2_000, max_value=200_000),
)

TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: cm
data:
  before: b
  target: {placement}
  after: a
last: [1, 2]
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: second}}
data: {{k: '{{{{v}}}}'}}
"""

# placement -> (how it is written, what `target` must hold when the value stays text)
PLACEMENTS: dict[str, tuple[str, Callable[[str], Any]]] = {
    "double-quoted": ('"{{v}}"', lambda v: v),
    "single-quoted": ("'{{ v }}'", lambda v: v),
    "double-quoted-with-text": ('"<{{v}}>\\n"', lambda v: f"<{v}>\n"),
    "literal-block": ("|-\n    {{v}}", lambda v: v),
    "literal-block-clip": ("|\n    x={{v}}", lambda v: f"x={v}\n"),
    "folded-block": (">-\n    {{v}}", lambda v: v),
    "plain": ("{{v}}", lambda v: v),
    "plain-with-text": ("pre-{{v}}-post", lambda v: f"pre-{v}-post"),
    "flow-sequence": ("[first, {{v}}, '{{v}}', last]", lambda v: ["first", v, v, "last"]),
    "flow-mapping": ('{k: {{v}}, q: "{{v}}", z: 2}', lambda v: {"k": v, "q": v, "z": 2}),
}
QUOTED = {"double-quoted", "single-quoted", "double-quoted-with-text", "literal-block", "literal-block-clip",
          "folded-block"}
# Only text made of these characters can resolve to something other than a string in a plain scalar.
TYPED_CHARACTERS = re.compile(r"[-+0-9A-Za-z_.:~]*")

COMPILED = {name: compile_manifest(TEMPLATE.format(placement=written), f"{name}.yaml")
            for name, (written, _) in PLACEMENTS.items()}
KEYED = compile_manifest("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: k}\n"
                         "data:\n  before: b\n  {{v}}: value\n  '{{v}}-q': quoted\n  after: a\n", "keyed.yaml")

PROPERTY = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def key_paths(node: Any, prefix: tuple[Any, ...] = ()) -> set[tuple[Any, ...]]:
    """Every key and item position of a document: what a value must never add to, remove or rename."""
    paths: set[tuple[Any, ...]] = set()
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        paths.add((*prefix, key))
        paths |= key_paths(child, (*prefix, key))
    return paths


def check_placement(placement: str, value: str) -> None:
    documents = COMPILED[placement]
    assert len(documents) == 2
    rendered = [document.render({"v": value}) for document in documents]
    benign = [document.render({"v": "benign"}) for document in documents]

    for got, template in zip(rendered, benign, strict=True):
        assert key_paths(got) == key_paths(template)
    assert rendered[0]["kind"] == "ConfigMap" and rendered[0]["last"] == [1, 2]
    assert list(rendered[0]["data"]) == ["before", "target", "after"]
    assert rendered[1]["data"] == {"k": value}, "the second document is untouched, its quoted value exact"

    target, expected = rendered[0]["data"]["target"], PLACEMENTS[placement][1](value)
    if placement in QUOTED:
        assert target == expected, "a quoted or block placement round-trips exactly"
    elif placement == "flow-sequence":
        assert [target[0], *target[2:]] == ["first", value, "last"] and not isinstance(target[1], (dict, list))
        assert target[1] == value or TYPED_CHARACTERS.fullmatch(value)
    elif placement == "flow-mapping":
        assert target["q"] == value and target["z"] == 2 and not isinstance(target["k"], (dict, list))
        assert target["k"] == value or TYPED_CHARACTERS.fullmatch(value)
    else:  # plain: one scalar, the exact text unless YAML would type it (only from a narrow alphabet)
        assert not isinstance(target, (dict, list))
        assert target == expected or TYPED_CHARACTERS.fullmatch(value)
    json.dumps(rendered)


@pytest.mark.parametrize("placement", PLACEMENTS)
@PROPERTY
@given(value=values)
def test_any_value_changes_only_its_scalar(placement: str, value: str) -> None:
    check_placement(placement, value)


@pytest.mark.parametrize("placement", ["double-quoted", "plain", "literal-block", "flow-sequence"])
@settings(max_examples=8, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(value=huge_values)
def test_huge_values_change_only_their_scalar(placement: str, value: str) -> None:
    check_placement(placement, value)


@PROPERTY
@given(value=values)
def test_any_value_in_a_key_is_exactly_that_key(value: str) -> None:
    assume(value not in ("before", "after"))  # a collision with a sibling is refused, tested in test_render.py
    (document,) = KEYED
    rendered = document.render({"v": value})
    assert rendered["data"] == {"before": "b", value: "value", f"{value}-q": "quoted", "after": "a"}
    assert list(rendered) == ["apiVersion", "kind", "metadata", "data"]
