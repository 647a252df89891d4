"""How many CPUs this process may use: what `BRIDGE_WORKERS=auto` (its default) starts.

`os.cpu_count()` is the machine's count; a process may be held to fewer by its CPU affinity (taskset,
cpusets) and, in a container, by a CFS quota (a Kubernetes CPU limit) that the affinity does not show.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    """The smaller of the CPUs the affinity mask allows and the cgroup's CPU quota, rounded up; 1 at least."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use (quota / period), or None when unlimited or unknown."""
    for quota_file, parse in ((_v2_file(root), _parse_v2), (root / "cpu" / "cpu.cfs_quota_us", None)):
        try:
            text = quota_file.read_text()
        except OSError:
            continue
        if parse is not None:
            return parse(text)
        try:  # cgroup v1: quota and period in two files, -1 = unlimited
            quota, period = int(text), int((root / "cpu" / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def _v2_file(root: Path) -> Path:
    """cpu.max of this process's own cgroup (v2), else the root's (a container sees its own as the root)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                own = root / line[3:].strip().lstrip("/") / "cpu.max"
                if own.is_file():
                    return own
    except OSError:
        pass
    return root / "cpu.max"


def _parse_v2(text: str) -> float | None:
    """`cpu.max`: "<quota> <period>" in microseconds, or "max <period>" when unlimited."""
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None
