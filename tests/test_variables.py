"""Unit tests for `consumer/variables.py`: the values one message gives the template variables."""

from __future__ import annotations

import base64
import json
import re

import pytest

from consumer.render import MissingVariablesError
from consumer.variables import MessageValues
from gitfaas.status import request_key_of_function, status_key


def message(body: bytes = b"", *, request_id: str = "req-1", params: dict[str, str] | None = None,
            identity: str | None = None) -> MessageValues:
    return MessageValues(
        request_id=request_id,
        identity=identity if identity is not None else f"{request_id}|1",  # same on every redelivery
        topic="timeToCollect",
        body=body,
        params=params or {},
        nats_url="nats://nats:4222",
        bridge_url="http://bridge:5000",
    )


def one(values: MessageValues, name: str, ordinal: int = 0) -> str:
    return values.resolve([name], ordinal)[name]


# ---- built-ins -----------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"hello", b"\x00\xff\xfe binary \n\r\n", "ünïcødé".encode(), b"x" * 5000])
def test_message_is_the_base64_of_the_exact_bytes(body):
    values = message(body)

    assert base64.b64decode(one(values, "MESSAGE"), validate=True) == body
    assert one(values, "PAYLOAD") == one(values, "MESSAGE")


def test_message_of_hello_is_the_documented_value():
    assert one(message(b"hello"), "MESSAGE") == "aGVsbG8="


def test_simple_builtins():
    values = message(b"x", request_id="req-42").resolve(
        ["REQUEST_UUID", "REQUEST_ID", "TOPIC", "NATS_URL", "BRIDGE_URL"], 0)

    assert values == {
        "REQUEST_UUID": "req-42",
        "REQUEST_ID": "req-42",
        "TOPIC": "timeToCollect",
        "NATS_URL": "nats://nats:4222",
        "BRIDGE_URL": "http://bridge:5000",
    }


def test_random_is_ten_lowercase_letters_or_digits():
    tokens = [one(message(request_id=f"r-{n}"), "RANDOM", ordinal) for n in range(20) for ordinal in range(3)]

    assert all(re.fullmatch(r"[a-z0-9]{10}", token) for token in tokens)
    assert len(set(tokens)) == len(tokens)


def test_random_is_the_same_for_the_same_request_and_document():
    # A redelivery builds a new MessageValues from the same stored message.
    assert one(message(b"a"), "RANDOM", 2) == one(message(b"a"), "RANDOM", 2)


def test_random_differs_across_documents_and_requests():
    base = one(message(), "RANDOM", 0)

    assert one(message(), "RANDOM", 1) != base
    assert one(message(request_id="req-2"), "RANDOM", 0) != base


def test_function_uid_names_its_request_and_document_and_is_deterministic():
    first = one(message(), "FUNCTION_UID", 0)

    key, ordinal, secret = first.split(".")
    assert request_key_of_function(first) == key == status_key(message().request_id)
    assert ordinal == "0" and re.fullmatch(r"[a-z0-9]{16}", secret)
    assert one(message(), "FUNCTION_UID", 0) == first
    assert one(message(), "FUNCTION_UID", 1) != first
    assert one(message(request_id="req-2"), "FUNCTION_UID", 0) != first


def test_builtins_cannot_be_overridden_by_parameters():
    values = message(b"hi", params={"MESSAGE": "forged", "TOPIC": "other", "RANDOM": "0000000000"})

    resolved = values.resolve(["MESSAGE", "TOPIC", "RANDOM"], 0)

    assert resolved["MESSAGE"] == "aGk="
    assert resolved["TOPIC"] == "timeToCollect"
    assert resolved["RANDOM"] != "0000000000"


def test_parameters_give_other_names_exactly():
    values = message(params={"replicas": "2", "note": "line 1\nline 2: #x"})

    assert values.resolve(["replicas", "note"], 0) == {"replicas": "2", "note": "line 1\nline 2: #x"}


# ---- body.* --------------------------------------------------------------------------------------

BODY = json.dumps({
    "a": {"b": "deep", "n": 3},
    "items": ["first", {"k": "v"}, 2.5],
    "file": {"name": "data.csv"},
    "flag": True,
    "text": "ünïcødé\nline",
}).encode()


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("body.a.b", "deep"),
        ("body.file.name", "data.csv"),
        ("body.items.0", "first"),
        ("body.items.1.k", "v"),
        ("body.text", "ünïcødé\nline"),
        ("body.a.n", "3"),
        ("body.items.2", "2.5"),
        ("body.flag", "true"),
    ],
)
def test_body_fields_of_a_json_body(name, expected):
    assert one(message(BODY), name) == expected


def test_objects_and_lists_come_as_compact_json():
    values = message(BODY)

    assert one(values, "body.a") == '{"b":"deep","n":3}'
    assert one(values, "body.items") == '["first",{"k":"v"},2.5]'
    assert json.loads(one(values, "body.items.1")) == {"k": "v"}


@pytest.mark.parametrize("name", ["body.nope", "body.a.b.c", "body.items.3", "body.items.-1", "body.items.x"])
def test_absent_body_fields_are_missing(name):
    with pytest.raises(MissingVariablesError) as caught:
        message(BODY).resolve([name], 0)

    assert caught.value.names == (name,)


@pytest.mark.parametrize("body", [b"not json", b"", b"{broken", b"\xff\xfe\x00"])
def test_a_body_that_is_not_json_has_no_fields(body):
    values = message(body)

    with pytest.raises(MissingVariablesError) as caught:
        values.resolve(["body.a"], 0)

    assert caught.value.names == ("body.a",)
    assert base64.b64decode(one(values, "MESSAGE")) == body  # the body itself is still there


# ---- missing variables ---------------------------------------------------------------------------


def test_every_missing_variable_is_named():
    values = message(b"plain text", params={"present": "yes"})

    with pytest.raises(MissingVariablesError) as caught:
        values.resolve(["present", "zeta", "MESSAGE", "alpha", "body.x", "RANDOM"], 0)

    assert set(caught.value.names) == {"zeta", "alpha", "body.x"}
    for name in ("zeta", "alpha", "body.x"):
        assert name in str(caught.value)
    assert "present" not in caught.value.names


def test_nothing_requested_resolves_to_nothing():
    assert message(b"x").resolve([], 0) == {}
