"""Step 1: collect readings into a CSV and compress it into the shared folder."""

from __future__ import annotations

import csv
import gzip
import io
import os
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import data_dir, message_json, publish_next  # noqa: E402

settings = message_json()
rows = int(settings.get("rows", 100))
seed = settings.get("seed", 42)
generator = random.Random(seed)
run = "run-" + os.environ.get("REQUEST_ID", "local")[:8]

buffer = io.StringIO()
writer = csv.writer(buffer)
writer.writerow(["sensor", "temperature", "humidity"])
for index in range(rows):
    writer.writerow([f"s{index % 5}", round(generator.uniform(10, 30), 2), round(generator.uniform(20, 80), 1)])

target = data_dir() / f"{run}.csv.gz"
target.write_bytes(gzip.compress(buffer.getvalue().encode()))
print(f"collected {rows} rows into {target}", flush=True)
publish_next("timeToUncompress", {"file": target.name, "run": run})
