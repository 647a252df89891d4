"""B5 render cost: one message through `consumer.documents.render_request` (variables, render,
stamping) for the 60-line, 6-variable Job manifest, against copying the same rendered dict in the
same process (`copy.deepcopy`, and a JSON round trip)."""

from __future__ import annotations

import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import JOB_MANIFEST, TOPIC, Table, Target, body, make_repo, median
from consumer.configuration import load_configuration
from consumer.documents import Request, render_request
from gitfaas.settings import Settings

TARGET_US = 100.0


def _per_call_us(function: Callable[[int], Any], calls: int, repeats: int) -> tuple[float, float]:
    """Median and best of `repeats` batches, microseconds per call."""
    batches = []
    for _ in range(repeats):
        started = time.perf_counter()
        for index in range(calls):
            function(index)
        batches.append((time.perf_counter() - started) / calls * 1e6)
    return median(batches), min(batches)


async def run(smoke: bool = False, profile: bool = False, work: Path | None = None) -> Table:
    calls, repeats = (300, 3) if smoke else (5_000, 5)
    with tempfile.TemporaryDirectory(prefix="gitfaas-bench-b5-") as tmp:
        repo = make_repo(Path(tmp) / "repo")
        settings = Settings(git_url=str(repo), kube_namespace="default", bridge_url="http://127.0.0.1:5000")
        config = load_configuration(repo, "0" * 40, settings)
    bodies = [body(i) for i in range(64)]
    requests = [Request(topic=TOPIC, request_id=f"0f8b2c1e-1111-4c55-9a0e-{i:012d}",
                        identity=f"0f8b2c1e-1111-4c55-9a0e-{i:012d}|{i + 1}|2026-01-01T00:00:00+00:00",
                        stream_seq=i + 1, body=bodies[i % 64], params={}) for i in range(1024)]

    def render(index: int) -> Any:
        return render_request(settings, config, requests[index % 1024])

    rendered = render(0)[0]
    assert rendered["metadata"]["annotations"]["pipeline.example.com/source"] == "run-0000000.csv.gz"

    def deep_copy(_index: int) -> Any:
        return copy.deepcopy(rendered)

    def json_round_trip(_index: int) -> Any:
        return json.loads(json.dumps(rendered))

    for function in (render, deep_copy, json_round_trip):  # warm up caches and the allocator
        _per_call_us(function, min(calls, 500), 1)
    render_med, render_best = _per_call_us(render, calls, repeats)
    copy_med, copy_best = _per_call_us(deep_copy, calls, repeats)
    json_med, json_best = _per_call_us(json_round_trip, calls, repeats)

    lines = JOB_MANIFEST.count("\n")
    table = Table("B5", "render cost per message (in process)",
                  ["operation", "µs/message (median)", "µs (best batch)", "x deepcopy"], smoke=smoke)
    table.rows = [
        [f"render_request: {lines}-line Job, 6 variables, stamped", render_med, render_best, render_med / copy_med],
        ["baseline: copy.deepcopy of the rendered dict", copy_med, copy_best, 1.0],
        ["baseline: json.loads(json.dumps(rendered dict))", json_med, json_best, json_med / copy_med],
    ]
    table.targets = [Target(f"render < {TARGET_US:.0f} µs per message", f"{render_med:.1f} µs",
                            render_med < TARGET_US)]
    table.notes = [f"{repeats} batches of {calls:,} calls each; 1 KiB JSON bodies (MESSAGE is their base64), "
                   "request ids and identities vary per call as in the consumer"]
    table.numbers = {"render_us": render_med, "deepcopy_us": copy_med, "json_us": json_med,
                     "ratio_vs_deepcopy": render_med / copy_med}
    return table
