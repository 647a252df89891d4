"""Turning rendered documents into the objects gitfaas applies (§7).

Each object gets the gitfaas labels and annotations, a namespace, and a name even when the
manifest only has `generateName` (server-side apply needs a name; deriving it from the request
keeps a redelivered message idempotent). Policy is checked again here, on the rendered values, so
a parameter placed in `namespace:` or `kind:` cannot escape what the commit check allowed.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from consumer.variables import random_token
from gitfaas.settings import Settings

MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_TOPIC = "gitfaas.io/topic"
LABEL_REQUEST_ID = "gitfaas.io/request-id"
ANNOTATION_STREAM_SEQ = "gitfaas.io/stream-seq"
ANNOTATION_COMMIT = "gitfaas.io/commit"
ANNOTATION_TOPIC = "gitfaas.io/topic"
ANNOTATION_REQUEST_ID = "gitfaas.io/request-id"

_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
_NOT_LABEL_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


class PolicyError(ValueError):
    """A rendered object gitfaas refuses to apply; permanent for this message.

    `path` is the key that is wrong (`("metadata", "namespace")`), so `gitfaas validate` can point
    at its line; None when the whole document is (a missing key).
    """

    def __init__(self, message: str, path: tuple[str, ...] | None = None) -> None:
        super().__init__(message)
        self.path = path


def kind_refused(kind: str, settings: Settings) -> str | None:
    """Why `kind` may not be applied (§7), or None.

    Compared without case (the API server would refuse `secret`, but a policy must not rely on
    that), and lists are refused too: a `SecretList` or a `List` could carry a banned kind.
    """
    banned = settings.banned_kinds_lowered
    lowered = kind.lower()
    if lowered in banned:
        return f"kind {kind} is banned (BANNED_KINDS)"
    if banned and (lowered == "list" or (lowered.endswith("list") and lowered[:-4] in banned)):
        return (f"kind {kind} is refused: a list could carry a kind of BANNED_KINDS; "
                "write each object as its own document")
    return None


def label_value(value: str) -> str:
    """A valid label value: the value itself, or a readable prefix plus a hash of the whole."""
    if _LABEL_VALUE.fullmatch(value):
        return value
    digest = hashlib.sha256(value.encode()).hexdigest()[:10]
    prefix = _NOT_LABEL_CHARS.sub("-", value)[:52].strip("._-")
    return f"{prefix}-{digest}" if prefix else digest


@dataclass(frozen=True, slots=True)
class Stamp:
    """What every object of one message is marked with."""

    topic: str
    request_id: str
    stream_seq: int
    commit: str
    identity: str  # see `variables.random_token`

    def labels(self) -> dict[str, str]:
        return {
            MANAGED_BY: "gitfaas",
            LABEL_TOPIC: label_value(self.topic),
            LABEL_REQUEST_ID: label_value(self.request_id),
        }

    def annotations(self) -> dict[str, str]:
        return {
            ANNOTATION_STREAM_SEQ: str(self.stream_seq),
            ANNOTATION_COMMIT: self.commit,
            # The exact values, in case a label had to be shortened.
            ANNOTATION_TOPIC: self.topic,
            ANNOTATION_REQUEST_ID: self.request_id,
        }


def prepare(
    document: dict[str, Any],
    *,
    ordinal: int,
    stamp: Stamp,
    namespace: str,
    settings: Settings,
) -> dict[str, Any]:
    """Mark one rendered document in place and check it against policy."""
    kind = document.get("kind")
    if not isinstance(kind, str) or not kind or not isinstance(document.get("apiVersion"), str):
        raise PolicyError("rendered document has no apiVersion or kind")
    refused = kind_refused(kind, settings)
    if refused:
        raise PolicyError(refused, ("kind",))
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        raise PolicyError(f"{kind}: metadata is not a mapping", ("metadata",))
    if not metadata.get("name"):
        generate = metadata.pop("generateName", None)
        if not isinstance(generate, str) or not generate:
            raise PolicyError(f"{kind}: rendered document has no metadata.name or generateName")
        metadata["name"] = generate + random_token(stamp.identity, ordinal, length=5)
    else:
        metadata.pop("generateName", None)
    own_namespace = metadata.get("namespace") or namespace
    if not isinstance(own_namespace, str) or own_namespace not in settings.namespaces_allowed:
        raise PolicyError(
            f"{kind} {metadata['name']}: namespace {own_namespace!r} is not allowed "
            f"(ALLOWED_NAMESPACES: {', '.join(sorted(settings.namespaces_allowed))})",
            ("metadata", "namespace") if metadata.get("namespace") else None,
        )
    metadata["namespace"] = own_namespace
    labels = stamp.labels()  # _merge copies it: one dict may serve both places
    _merge(metadata, "labels", labels)
    _merge(metadata, "annotations", stamp.annotations())
    spec = document.get("spec")
    if kind == "Job" and isinstance(spec, dict):
        template = spec.get("template")
        if isinstance(template, dict):
            pod_meta = template.setdefault("metadata", {})
            if isinstance(pod_meta, dict):
                _merge(pod_meta, "labels", labels)
    return document


def _merge(metadata: dict[str, Any], key: str, values: Mapping[str, str]) -> None:
    current = metadata.get(key)
    if not isinstance(current, dict):
        current = {}
    metadata[key] = {**{k: str(v) for k, v in current.items()}, **values}
