"""The values a message gives the template variables of §4.

Only the variables a topic's documents actually use are computed: a topic without `MESSAGE`
never pays for base64, one without `body.*` never parses JSON.
"""

from __future__ import annotations

import binascii
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from consumer.errors import PermanentError
from consumer.render import MissingVariablesError
from gitfaas import safejson
from gitfaas.status import status_key

_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyz"
# `_PAIRS[n]` for n < 36 * 36: the base-36 digits of n, least significant first.
_PAIRS = tuple(low + high for high in _ALPHABET for low in _ALPHABET)
PER_DOCUMENT = frozenset({"RANDOM", "FUNCTION_UID"})


def random_token(identity: str, ordinal: int, length: int = 10) -> str:
    """`RANDOM`: looks random, but is the same on every redelivery of the same stored message.

    `identity` names the stored message (request id, stream sequence, store time): a redelivery
    has the same, a replay or a stream recreated from scratch does not, so names never collide
    with objects of an earlier, different message.
    """
    number = int.from_bytes(hashlib.sha256(f"{identity}\0{ordinal}".encode()).digest()[:12], "big")
    # Base 36, least significant digit first; two digits per step (`_PAIRS`), half the divisions.
    chars = []
    for _ in range(length >> 1):
        number, pair = divmod(number, 1296)
        chars.append(_PAIRS[pair])
    if length & 1:
        chars.append(_ALPHABET[number % 36])
    return "".join(chars)


def function_uid(request_id: str, identity: str, ordinal: int) -> str:
    """`FUNCTION_UID`: `<request key>.<document>.<16 unguessable characters>`.

    It names its request, so `POST /response/{uid}` finds the status document without an index
    (one store write less per message); the bridge checks the whole uid against that document.
    """
    return f"{status_key(request_id)}.{ordinal}.{random_token(identity + '/function', ordinal, 16)}"


@dataclass(slots=True)
class MessageValues:
    """Everything one message can say; `resolve` turns a set of names into their values."""

    request_id: str
    topic: str
    body: bytes
    identity: str
    params: dict[str, str]
    nats_url: str
    bridge_url: str
    _json: Any = field(default=None, init=False)
    _json_error: str | None = field(default=None, init=False)
    _json_parsed: bool = field(default=False, init=False)
    _message: str | None = field(default=None, init=False)

    def resolve(self, names: Iterable[str], ordinal: int) -> dict[str, str]:
        """Values for one document (`ordinal` is its position within the topic).

        Raises `MissingVariablesError` naming every variable without a value.
        """
        values: dict[str, str] = {}
        missing: list[str] = []
        for name in names:
            value = self.value(name, ordinal)
            if value is None:
                missing.append(name)
            else:
                values[name] = value
        if missing:
            raise MissingVariablesError(tuple(sorted(missing)))
        return values

    def value(self, name: str, ordinal: int) -> str | None:
        if name in ("MESSAGE", "PAYLOAD"):
            if self._message is None:
                self._message = binascii.b2a_base64(self.body, newline=False).decode("ascii")  # = b64encode
            return self._message
        if name in ("REQUEST_UUID", "REQUEST_ID"):
            return self.request_id
        if name == "RANDOM":
            return random_token(self.identity, ordinal)
        if name == "FUNCTION_UID":
            return function_uid(self.request_id, self.identity, ordinal)
        if name == "TOPIC":
            return self.topic
        if name == "NATS_URL":
            return self.nats_url
        if name == "BRIDGE_URL":
            return self.bridge_url
        if name.startswith("body."):
            return self._body_field(name[5:])
        return self.params.get(name)

    def _body_field(self, path: str) -> str | None:
        if not self._json_parsed:
            self._json_parsed = True
            try:
                self._json = safejson.loads(self.body)
            except safejson.JsonTooDeep as exc:  # not "missing": this body can never give a field
                raise PermanentError(f"the body cannot give body.{path}: {exc}") from None
            except (ValueError, UnicodeDecodeError):
                self._json_error = "the body is not JSON"
        if self._json_error:
            return None
        node = self._json
        for part in path.split("."):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        if isinstance(node, str):
            return node
        return json.dumps(node, separators=(",", ":"))
