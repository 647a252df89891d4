"""The consumer's Prometheus metrics (module level: one registry per process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter("gitfaas_consumer_messages_total", "Messages handled, by topic and outcome",
                   ["topic", "outcome"])
APPLY_SECONDS = Histogram("gitfaas_consumer_apply_seconds", "Time to render and apply one message",
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
IN_FLIGHT = Gauge("gitfaas_consumer_in_flight", "Messages being handled now")
DEAD_LETTERS = Counter("gitfaas_consumer_dead_letters_total", "Messages given up on, by topic", ["topic"])
GIT_SYNCS = Counter("gitfaas_git_syncs_total", "Repository syncs, by result", ["result"])
CONFIG_OK = Gauge("gitfaas_config_loaded", "1 when the newest commit loaded, 0 when it was refused")
JOB_OUTCOMES = Counter("gitfaas_job_states_total", "Job state changes seen, by topic and state", ["topic", "state"])
