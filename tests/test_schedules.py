"""Issue 15: schedules with an injected clock (ticks, the one missed tick after downtime), and the
local executor's size-capped, rotated Job logs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js.errors import KeyNotFoundError

from consumer.executors import local
from consumer.scheduler import Scheduler, message_id
from gitfaas.schedules import next_tick, previous_tick, schedule_problem, tick_text
from gitfaas.settings import Settings


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@dataclass
class Topic:
    schedule: str
    timezone: str | None = None
    message: Any = None


@dataclass
class Bucket:
    """The few calls the scheduler makes on the `gitfaas_config` bucket."""

    values: dict[str, bytes] = field(default_factory=dict)

    async def get(self, key: str) -> Any:
        if key not in self.values:
            raise KeyNotFoundError
        return type("Entry", (), {"value": self.values[key]})()

    async def put(self, key: str, value: bytes) -> int:
        self.values[key] = value
        return 1


@dataclass
class JetStream:
    published: list[tuple[str, bytes, dict[str, str]]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    async def publish(self, subject: str, data: bytes, headers: dict[str, str], stream: str) -> Any:
        duplicate = headers["Nats-Msg-Id"] in self.seen  # the stream's duplicate window
        self.seen.add(headers["Nats-Msg-Id"])
        if not duplicate:
            self.published.append((subject, data, headers))
        return type("Ack", (), {"duplicate": duplicate, "seq": len(self.published)})()


class Consumer:
    def __init__(self, topics: dict[str, Topic], bucket: Bucket, js: JetStream) -> None:
        self.config = type("Config", (), {"topics": topics})()
        self.repository = type("Repository", (), {"bucket": bucket})()
        self.js = js
        self.settings = Settings()


def test_ticks_in_a_timezone_and_expressions_checked() -> None:
    assert tick_text(next_tick("0 9 * * *", "Europe/Paris", at("2026-03-28T12:00:00"))) == "2026-03-29T07:00:00Z"
    assert tick_text(next_tick("*/10 * * * * *", None, at("2026-01-01T00:00:05"))) == "2026-01-01T00:00:10Z"
    assert previous_tick("0 * * * *", None, at("2026-01-01T10:00:00")) == at("2026-01-01T10:00:00")
    assert schedule_problem("0 * * * *") is None and schedule_problem("*/5 * * * * *") is None
    assert "not a valid cron" in (schedule_problem("0 25 * * *") or "")
    assert "fields" in (schedule_problem("* * *") or "")
    assert "IANA" in (schedule_problem("0 * * * *", "Nowhere/Else") or "")


async def test_each_tick_published_once_and_at_most_one_missed_tick_after_downtime() -> None:
    js, bucket = JetStream(), Bucket()
    now = [at("2026-01-01T10:30:00")]
    topics = {"hourly": Topic("0 * * * *", message={"rows": 3})}
    first = Scheduler(Consumer(topics, bucket, js), clock=lambda: now[0])
    second = Scheduler(Consumer(topics, bucket, js), clock=lambda: now[0])  # another consumer process
    for scheduler in (first, second):
        await scheduler._round()
    assert js.published == [], "a schedule seen for the first time starts at its next tick"
    for hour in (11, 12, 13):
        now[0] = at(f"2026-01-01T{hour}:00:00")
        for scheduler in (first, second):
            await scheduler._round()
    ticks = [headers["Gitfaas-Schedule"] for _subject, _data, headers in js.published]
    assert ticks == ["2026-01-01T11:00:00Z", "2026-01-01T12:00:00Z", "2026-01-01T13:00:00Z"]
    subject, data, headers = js.published[0]
    assert subject == "gitfaas.topics.hourly" and json.loads(data) == {"rows": 3}
    assert headers["Nats-Msg-Id"] == message_id("hourly", at("2026-01-01T11:00:00"))
    assert headers["Nats-Msg-Id"] == "gitfaas-schedule:hourly:2026-01-01T11:00:00Z"

    # Down from 13:00 to 17:30: ticks 14:00 to 17:00 were missed; only 17:00 is run, at once.
    now[0] = at("2026-01-01T17:30:00")
    restarted = Scheduler(Consumer(topics, bucket, js), clock=lambda: now[0])
    await restarted._round()
    assert [h["Gitfaas-Schedule"] for *_rest, h in js.published][3:] == ["2026-01-01T17:00:00Z"]
    await restarted._round()
    assert len(js.published) == 4, "and only once"
    now[0] = at("2026-01-01T18:00:00")
    await restarted._round()
    assert js.published[-1][2]["Gitfaas-Schedule"] == "2026-01-01T18:00:00Z"
    # A consumer that comes late (after the duplicate window) does not publish a tick again.
    late = Scheduler(Consumer(topics, bucket, js), clock=lambda: now[0])
    assert await late.publish("hourly", topics["hourly"], at("2026-01-01T18:00:00")) is False
    assert len(js.published) == 5


def test_local_job_logs_are_capped_and_rotated(tmp_path: Path, monkeypatch: Any) -> None:
    monkeypatch.setattr(local, "LOG_MAX_BYTES", 1000)
    path = tmp_path / "logs" / "default" / "job.log"
    job_log = local._JobLog(path)
    for index in range(100):
        job_log.write(f"[job] line {index:03d} " + "x" * 20, output=True)
    job_log.close()
    rotated = path.with_name("job.log.1")
    assert rotated.exists() and path.stat().st_size <= 1100 and rotated.stat().st_size <= 1100
    lines = local._JobLog.read(path)
    assert lines[-1].startswith("[job] line 099") and len(lines) < 100, "older output was dropped"
    assert [int(line.split()[2]) for line in lines] == list(range(100 - len(lines), 100)), "in order"
    assert list(job_log.last) == [f"line {i:03d} " + "x" * 20 for i in range(95, 100)]
