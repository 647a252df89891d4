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
END_TO_END_SECONDS = Histogram("gitfaas_consumer_end_to_end_seconds",
                               "From the bridge accepting a message to its objects applied",
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
REDELIVERIES = Counter("gitfaas_consumer_redeliveries_total", "Messages received again after a first delivery",
                       ["topic"])
COMMIT = Gauge("gitfaas_config_commit_info", "The commit whose configuration is in use (value 1)", ["commit"])
STREAM_PENDING = Gauge("gitfaas_jetstream_pending", "Messages in the stream not yet delivered to the consumer")
STREAM_ACK_PENDING = Gauge("gitfaas_jetstream_ack_pending", "Messages delivered and not yet acknowledged")
STREAM_REDELIVERED = Gauge("gitfaas_jetstream_redelivered", "Messages JetStream is redelivering now")
STALLED = Gauge("gitfaas_consumer_stalled",
                "1 while messages wait but nothing has been applied for STALL_SECONDS")
API_THROTTLED = Counter("gitfaas_consumer_api_throttled_total",
                        "429 Too Many Requests answers from the API server (every apply then waits Retry-After)")
APPLY_LIMIT = Gauge("gitfaas_consumer_apply_limit", "Applies the executor lets run at once (halved on a 429)")
API_WARNINGS = Counter("gitfaas_consumer_api_warnings_total", "Warning headers in the API server's answers to applies")
