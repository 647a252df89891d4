"""What every step of the example pipeline shares: reading its message, finding the shared
folder, and publishing the next topic through the gitfaas bridge. Standard library only."""

from __future__ import annotations

import base64
import json
import os
import sys
import urllib.request
from pathlib import Path


def message() -> bytes:
    """The body that started this step (gitfaas passes it base64 in MESSAGE)."""
    return base64.b64decode(os.environ.get("MESSAGE", ""))


def message_json() -> dict:
    try:
        data = json.loads(message() or b"{}")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def data_dir() -> Path:
    """The shared volume: a PVC mounted at /data on a cluster, a folder under .gitfaas/ locally."""
    path = Path(os.environ.get("GITFAAS_VOLUME_DATA", "/data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def publish_next(topic: str, body: dict) -> None:
    """Chain: POST the next topic to the bridge, linked to this request as its parent."""
    bridge = os.environ["BRIDGE_URL"].rstrip("/")
    parent = os.environ.get("REQUEST_ID", "")
    request = urllib.request.Request(
        f"{bridge}/publish/{topic}?parent={parent}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.loads(response.read())
    print(f"published {topic}: request {answer['request_id']}", flush=True)


def fail(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    raise SystemExit(1)
