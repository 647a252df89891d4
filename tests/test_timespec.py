"""`since` text, as `GET /runs?since=` and `gitfaas runs/replay --since` take it (one parser for both)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gitfaas.timespec import parse_since


def test_durations_and_iso_times() -> None:
    now = datetime.now(UTC)
    assert abs((now - parse_since("1h30m")) - timedelta(minutes=90)) < timedelta(seconds=5)
    assert parse_since("2026-11-29T10:00:00Z") == datetime(2026, 11, 29, 10, tzinfo=UTC)
    assert parse_since("2026-11-29T10:00:00").tzinfo == UTC


def test_a_duration_longer_than_time_itself_means_everything_not_a_crash() -> None:
    """`?since=999…9h` used to answer 500 (timedelta overflow)."""
    assert parse_since("9" * 40 + "h") == datetime.min.replace(tzinfo=UTC)


@pytest.mark.parametrize("text", ["yesterday", "1x", "-1h", "9" * 100 + "h", "1h 30m", "\x00"])
def test_other_text_is_refused_naming_the_field(text: str) -> None:
    with pytest.raises(ValueError, match=r"^--since: use a duration like 30m, 1h, 2d or an ISO time$"):
        parse_since(text, "--since")
