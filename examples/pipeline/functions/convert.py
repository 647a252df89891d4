"""Step 3: convert the CSV into a JSON summary: the pipeline's final file."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import data_dir, fail, message_json  # noqa: E402

request = message_json()
source = data_dir() / str(request.get("file", ""))
if not request.get("file") or not source.is_file():
    fail(f"nothing to convert: {source} does not exist")
with source.open(newline="") as handle:
    rows = list(csv.DictReader(handle))
summary = {
    "run": request.get("run"),
    "rows": len(rows),
    "sensors": sorted({row["sensor"] for row in rows}),
    "temperature": {
        "min": min(float(r["temperature"]) for r in rows),
        "max": max(float(r["temperature"]) for r in rows),
        "mean": round(statistics.fmean(float(r["temperature"]) for r in rows), 3),
    },
    "humidity_mean": round(statistics.fmean(float(r["humidity"]) for r in rows), 3),
}
target = source.with_suffix(".summary.json")
target.write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {target}", flush=True)
