"""Step 2: uncompress the collected file next to it."""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import data_dir, fail, message_json, publish_next  # noqa: E402

request = message_json()
source = data_dir() / str(request.get("file", ""))
if not request.get("file") or not source.is_file():
    fail(f"nothing to uncompress: {source} does not exist")
target = source.with_suffix("")  # run-x.csv.gz -> run-x.csv
target.write_bytes(gzip.decompress(source.read_bytes()))
print(f"uncompressed {source.name} into {target.name} ({target.stat().st_size} bytes)", flush=True)
publish_next("timeToConvert", {"file": target.name, "run": request.get("run")})
