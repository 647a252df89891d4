"""Fan-out: one message to `timeToSurvey` starts one Job per sensor, all written in survey.yaml.

Each Job surveys its own sensor (SENSOR, set per document), writes `<run>.survey-<sensor>.json` to
the shared folder and answers the request under its own FUNCTION_UID, so
`GET $BRIDGE_URL/response/<request_id>` lists one answer per sensor, in the file's order.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import data_dir, message_json  # noqa: E402

settings = message_json()
sensor = os.environ["SENSOR"]
rows = int(settings.get("rows", 20))
generator = random.Random(f"{settings.get('seed', 42)}/{sensor}")
readings = [round(generator.uniform(10, 30), 2) for _ in range(rows)]
run = "run-" + os.environ.get("REQUEST_ID", "local")[:8]
result = {"run": run, "sensor": sensor, "rows": rows, "min": min(readings), "max": max(readings),
          "mean": round(statistics.fmean(readings), 3)}

target = data_dir() / f"{run}.survey-{sensor}.json"
target.write_text(json.dumps(result, indent=2) + "\n")
print(f"surveyed {rows} readings of {sensor} into {target.name}", flush=True)

answer = urllib.request.Request(
    f"{os.environ['BRIDGE_URL'].rstrip('/')}/response/{os.environ['FUNCTION_UID']}",
    data=json.dumps(result).encode(), headers={"Content-Type": "application/json"}, method="POST")
with urllib.request.urlopen(answer, timeout=10):
    pass
