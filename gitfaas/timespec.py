"""`--since` and `?since=`: how far back, as a duration (`90s`, `15m`, `1h`, `2d`, `1h30m`) or an ISO time.

One parser for the command line (`gitfaas runs`, `gitfaas replay`) and the bridge (`GET /runs`), so
both accept and refuse the same text with the same sentence.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TEXT = 64  # longer text is no duration or time anyone means


def parse_since(text: str, what: str = "since") -> datetime:
    """The moment `text` names; ValueError naming `what` and the accepted forms otherwise."""
    refusal = f"{what}: use a duration like 30m, 1h, 2d or an ISO time"
    if len(text) > MAX_TEXT:
        raise ValueError(refusal)
    parts = _DURATION.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        seconds = sum(float(n) * _UNITS[u] for n, u in parts)
        try:
            return datetime.now(UTC) - timedelta(seconds=seconds)
        except (OverflowError, ValueError):  # before year 1: everything is newer than that
            return datetime.min.replace(tzinfo=UTC)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(refusal) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
