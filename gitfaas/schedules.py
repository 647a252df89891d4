"""Cron schedules of topics (§3, §11): `"schedule": "0 * * * *"` with an optional `"timezone"`.

Expressions are read by croniter: five fields (minute hour day-of-month month day-of-week), or six
with seconds first (`*/10 * * * * *`: every ten seconds). Ticks are computed in the topic's
timezone (IANA name, default UTC), so `0 9 * * *` with `Europe/Paris` follows daylight saving.
Shared by the consumer (which publishes the ticks), the bridge (`/topics` shows `next_tick`) and
`gitfaas validate` (through the configuration's checks).
"""

from __future__ import annotations

from datetime import UTC, datetime, tzinfo
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

HEADER_SCHEDULE = "Gitfaas-Schedule"  # on a scheduled publish: the tick it is for (RFC 3339)


def zone(name: str | None) -> tzinfo:
    """The timezone of a schedule; `ValueError` for a name that is not an IANA timezone."""
    if not name or name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"timezone {name!r} is not an IANA timezone name (such as UTC or Europe/Paris)") from None


def _cron(expression: str, start: datetime) -> croniter:
    return croniter(expression, start, second_at_beginning=len(expression.split()) == 6)


def schedule_problem(expression: object, timezone: object = None) -> str | None:
    """Why this schedule cannot be used (a sentence), or None."""
    if not isinstance(expression, str) or not expression.strip():
        return "expected a cron expression (string), such as \"0 * * * *\""
    fields = len(expression.split())
    if fields not in (5, 6):
        return (f"{expression!r} has {fields} fields: a cron expression has 5 (minute hour day month weekday), "
                "or 6 with seconds first")
    if not croniter.is_valid(expression, second_at_beginning=fields == 6):
        return f"{expression!r} is not a valid cron expression"
    if timezone is not None and not isinstance(timezone, str):
        return "timezone: expected an IANA timezone name (string)"
    try:
        zone(timezone)  # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)
    try:
        next_tick(expression, timezone, datetime.now(UTC).timestamp())  # type: ignore[arg-type]
    except Exception as exc:  # noqa: BLE001 — e.g. an expression that never fires (30 February)
        return f"{expression!r} never fires ({exc})"
    return None


def next_tick(expression: str, timezone: str | None, after: float) -> float:
    """The first tick strictly after `after` (seconds since the epoch)."""
    start = datetime.fromtimestamp(after, zone(timezone))
    return float(_cron(expression, start).get_next(float))


def previous_tick(expression: str, timezone: str | None, at: float) -> float:
    """The last tick at or before `at`."""
    start = datetime.fromtimestamp(at, zone(timezone))
    tick = float(_cron(expression, start).get_prev(float))
    following = next_tick(expression, timezone, tick)
    return following if following <= at else tick


def tick_text(tick: float) -> str:
    """A tick as RFC 3339 UTC (to the second, or the millisecond when it has a fraction)."""
    moment = datetime.fromtimestamp(tick, UTC)
    spec = "seconds" if moment.microsecond == 0 else "milliseconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")
