"""What a publish must satisfy before it is stored, and what waiting on it means (§5, §11).

The bridge and `gitfaas publish` both use this module, so a user reads the same sentence and gets
the same answer whichever way they publish. What a topic needs comes from the configuration
state the consumer writes to the `gitfaas_config` bucket (`GET /topics` shows the same document):
each topic's `variables` (every `{{NAME}}` its manifests use) and `params` (defaults from
config.json; `null` declares a parameter with no default, which every message must then give).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gitfaas.subjects import BUILTIN_VARIABLES

# ---- the body -------------------------------------------------------------------------------

ACCEPTED_CONTENT_TYPES = (
    "any text/* type (and plain/text, as the original gitfaas documented), application/json or any "
    "*/*+json type (checked to be JSON), application/octet-stream, application/x-www-form-urlencoded "
    "(what curl -d sends), any other single type, or none"
)


def content_type_refusal(content_type: str) -> str | None:
    """The sentence of a `415`, or None when a body of this type is taken (as bytes, unchanged).

    A body is opaque bytes whatever its type says (the original gitfaas read the raw body), so
    only a type that is several bodies in one envelope (`multipart/*`) cannot be one message.
    """
    if content_type.lower().startswith("multipart/"):
        return (f"content type {content_type!r} cannot be a message body (it holds several parts); "
                f"send the body itself, as {ACCEPTED_CONTENT_TYPES}")
    return None


def declares_json(content_type: str) -> bool:
    content_type = content_type.lower()
    return content_type == "application/json" or content_type.endswith("+json")


def too_large(limit: int) -> str:
    return f"body is larger than MAX_PAYLOAD_BYTES ({limit})"


# ---- the topic and its parameters -----------------------------------------------------------

NO_CONFIGURATION = "no configuration loaded yet (is a consumer running?)"


def unknown_topic(topic: str, commit: str | None) -> str:
    return f"topic {topic!r} is not in the configuration in use (commit {commit})"


def is_parameter(name: str) -> bool:
    """A variable a message gives (query parameter, `Gitfaas-Param-` header, `-p`), not gitfaas."""
    return name not in BUILTIN_VARIABLES and not name.startswith("body.")


def missing_parameters(topic: str, names: Iterable[str]) -> str:
    names = sorted(names)
    noun = "parameter" if len(names) == 1 else "parameters"
    return (f"topic {topic!r} needs {noun} the message does not give: {', '.join(names)} "
            f"(give each as a parameter of the message, or a default in the topic's \"params\" in config.json)")


@dataclass(frozen=True, slots=True)
class TopicParameters:
    """The parameters of one topic: which a message must give, and the defaults of the others."""

    topic: str
    required: frozenset[str] = frozenset()
    defaults: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, topic: str, variables: Iterable[str], params: Mapping[str, str | None] | None = None
           ) -> TopicParameters:
        """`params` as config.json writes it: a string is a default, `null` declares a required one."""
        params = params or {}
        defaults = {name: value for name, value in params.items() if isinstance(value, str)}
        used = {name for name in variables if is_parameter(name)}
        declared = {name for name, value in params.items() if value is None}
        return cls(topic, frozenset((used | declared) - defaults.keys()), defaults)

    @classmethod
    def from_summary(cls, summary: Mapping[str, Any]) -> TopicParameters:
        """From one entry of the configuration state's `topics` (as `/topics` lists it)."""
        params = summary.get("params")
        return cls.of(str(summary.get("name")), summary.get("variables") or (),
                      params if isinstance(params, Mapping) else None)

    def missing(self, given: Collection[str]) -> list[str]:
        """Required parameters that neither the message nor a default gives, sorted."""
        if not self.required:  # most topics: the publish hot path stops here
            return []
        return sorted(name for name in self.required if name not in given)

    def refusal(self, given: Collection[str]) -> str | None:
        missing = self.missing(given)
        return missing_parameters(self.topic, missing) if missing else None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a publish is refused before anything is stored: the HTTP code and the sentence."""

    status: int
    error: str


class ConfigurationView:
    """The configuration in use, as the consumer published it: what can be checked before storing."""

    __slots__ = ("commit", "state", "topics")

    def __init__(self, state: Mapping[str, Any] | None) -> None:
        self.state = state
        self.commit: str | None = (state or {}).get("commit") or None
        self.topics: dict[str, TopicParameters] = {
            str(entry["name"]): TopicParameters.from_summary(entry)
            for entry in (state or {}).get("topics", []) if isinstance(entry, Mapping) and "name" in entry
        }

    def refusal(self, topic: str, params: Collection[str]) -> Refusal | None:
        """Why a message on `topic` with these parameter names would certainly fail, or None."""
        if not self.commit:
            return Refusal(503, NO_CONFIGURATION)
        found = self.topics.get(topic)
        if found is None:
            return Refusal(404, unknown_topic(topic, self.commit))
        missing = found.refusal(params)
        if missing:
            return Refusal(400, missing)
        return None


# ---- waiting ------------------------------------------------------------------------------

ENDED_BADLY = frozenset({"failed", "dead", "cancelled", "unknown"})  # unknown: a Job's outcome was lost


def is_applied(document: Mapping[str, Any]) -> bool:
    """`wait=applied` is over: the objects are applied (or the request already ended badly)."""
    return document.get("state") not in (None, "pending")


def is_completed(document: Mapping[str, Any]) -> bool:
    """`wait=completed` is over: its Jobs ended (or it has none and is applied), or it ended badly."""
    state = document.get("state")
    if state == "succeeded" or state in ENDED_BADLY:
        return True
    has_jobs = any(d.get("kind") == "Job" for d in document.get("documents", []))
    return state == "applied" and not has_jobs


# What `?wait=` and `gitfaas publish --wait` accept, and when each is over (§11 adds `run`).
WAITS: dict[str, Callable[[Mapping[str, Any]], bool]] = {"applied": is_applied, "completed": is_completed}


def wait_status(reached: bool, document: Mapping[str, Any] | None) -> int:
    """The HTTP code of a wait: `200` reached, `422` the request ended badly, `504` timed out."""
    if document is not None and document.get("state") in ENDED_BADLY:
        return 422
    return 200 if reached else 504


def wait_sentence(wait: str, status: int, document: Mapping[str, Any] | None, timeout: float) -> str | None:
    """What `gitfaas publish --wait` says on standard error when the wait did not succeed."""
    if status == 422 and document is not None:
        error = document.get("error")
        return f"request {document.get('request_id')} ended {document.get('state')}" + (f": {error}" if error else "")
    if status == 504:
        state = (document or {}).get("state", "pending")
        return f"not {wait} within {timeout:g}s (state {state})"
    return None
