"""What the API server said when it refused something, kept readable (issue 14).

A refusal comes as a `Status` object: `reason` (`Invalid`, `Forbidden`, …), `message`, and for
validation errors `details.causes[]` with the `field` and its own `message`. Messages can be
thousands of characters long because the server quotes the whole offending value (a pod template
as a Go struct), with the words that matter ("field is immutable") at the very end. So they are
never cut at a fixed length: long quoted values are folded to `…` first, then what is still too
long keeps its beginning *and* its end.

One case gets a sentence of its own: a Job whose pod template differs from the existing Job of
the same name (Job templates cannot change).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

MAX_TEXT = 600  # characters of one reason, after folding
MAX_CAUSES = 5
_FOLD_OVER = 60  # a quoted value ({…}, […], "…") longer than this is folded
_OPENERS = {"{": "}", "[": "]"}


def fold(text: str, limit: int = MAX_TEXT) -> str:
    """`text` with long bracketed or quoted values folded to `{…}` / `[…]` / `"…"`, then, if still
    longer than `limit`, its beginning and end joined by ` … ` (the end often says why)."""
    text = " ".join(text.split())
    out: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in _OPENERS or char == '"':
            end = _closing(text, i)
            if end is not None:  # a short value is kept whole (its closing quote opens nothing)
                out.append(f"{char}…{_OPENERS.get(char, char)}" if end - i > _FOLD_OVER else text[i:end + 1])
                i = end + 1
                continue
        out.append(char)
        i += 1
    folded = "".join(out)
    if len(folded) <= limit:
        return folded
    half = (limit - 3) // 2
    return f"{folded[:half].rstrip()} … {folded[-half:].lstrip()}"


def _closing(text: str, start: int) -> int | None:
    """Where the bracket or quote opened at `start` closes (nesting and escapes respected), or None."""
    opener = text[start]
    if opener == '"':
        i = start + 1
        while i < len(text):
            if text[i] == "\\":
                i += 2
                continue
            if text[i] == '"':
                return i
            i += 1
        return None
    depth, i, quoted = 0, start, False
    while i < len(text):
        char = text[i]
        if quoted:
            if char == "\\":
                i += 1
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


@dataclass(frozen=True, slots=True)
class ApiStatus:
    """The parts of a refusal that mean something to a person."""

    code: int | None
    reason: str = ""
    message: str = ""
    causes: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (field, message)

    @classmethod
    def parse(cls, code: int | None, payload: bytes | str | dict[str, Any] | None) -> ApiStatus:
        body: Any = payload
        if isinstance(payload, bytes | str):
            try:
                body = json.loads(payload)
            except ValueError:
                text = payload.decode(errors="replace") if isinstance(payload, bytes) else payload
                return cls(code, message=text)
        if not isinstance(body, dict):
            return cls(code)
        details = body.get("details") if isinstance(body.get("details"), dict) else {}
        causes = tuple(
            (str(cause.get("field") or ""), str(cause.get("message") or cause.get("reason") or ""))
            for cause in details.get("causes") or [] if isinstance(cause, dict)
        )
        return cls(code if code is not None else _int(body.get("code")), str(body.get("reason") or ""),
                   str(body.get("message") or ""), causes)

    @property
    def immutable_template(self) -> bool:
        """A Job's pod template differs from the existing Job's (422, `spec.template … immutable`)."""
        fields = [(f, m) for f, m in self.causes if f == "spec.template" or f.startswith("spec.template.")]
        if any("immutable" in m for _, m in fields):
            return True
        return self.code == 422 and "spec.template" in self.message and "field is immutable" in self.message

    def text(self) -> str:
        """`HTTP 422 Invalid: <message folded>; <field>: <cause>; …` — the whole meaning, bounded."""
        head = f"HTTP {self.code}" if self.code is not None else "no HTTP answer"
        if self.reason:
            head += f" {self.reason}"
        parts = []
        message = self.message
        if self.causes:
            # The message repeats the causes after "is invalid:"; the causes say it field by field.
            message = message.split(": ", 1)[0] if " is invalid: " in message else message
        if message:
            parts.append(fold(message, MAX_TEXT // 2))
        shown = self.causes[:MAX_CAUSES]
        for field_name, cause in shown:
            cause = fold(cause, 200)
            parts.append(f"{field_name}: {cause}" if field_name else cause)
        if len(self.causes) > len(shown):
            parts.append(f"and {len(self.causes) - len(shown)} more")
        return fold(f"{head}: {'; '.join(parts)}" if parts else head, MAX_TEXT)


def immutable_sentence(kind: str, name: str, owner: str | None = None) -> str:
    """What a user can do when a fixed-name Job already exists with another template."""
    who = f" (created by request {owner})" if owner else ""
    return (f"{kind} {name} already exists{who} with a different template; Job specs cannot change — "
            "give the name a per-request part such as {{RANDOM}}, or let the old Job go first "
            "(ttlSecondsAfterFinished)")


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


_WARNING = re.compile(r'^\s*\d{3}\s+\S+\s+"(?P<text>(?:[^"\\]|\\.)*)"')


def warning_texts(values: list[str]) -> list[str]:
    """The texts of HTTP `Warning` headers (`299 - "text"`, RFC 7234), in order, without repeats."""
    texts: list[str] = []
    for value in values:
        match = _WARNING.match(value)
        text = match["text"].replace('\\"', '"').replace("\\\\", "\\") if match else value.strip()
        text = fold(text, 400)
        if text and text not in texts:
            texts.append(text)
    return texts
