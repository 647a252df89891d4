"""How many CPUs this process may use: what `BRIDGE_WORKERS=auto` (its default) starts.

`os.cpu_count()` is the machine's count; a process may be held to fewer by its CPU affinity (taskset,
cpusets) and by a CFS quota (a Kubernetes CPU limit, a systemd CPUQuota) on its cgroup or any cgroup
above it, which the affinity does not show.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The smaller of the CPUs the affinity mask allows and the cgroup's CPU quota, rounded up; 1 at least."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs' worth of time this process's cgroups allow (the smallest quota / period from its own cgroup
    up to the root), or None when none is limited or nothing can be read."""
    v2, v1 = _own_paths(proc_cgroup)
    quotas = [_v2_quota(directory) for directory in _upwards(root, v2)]
    if (root / "cpu").is_dir():  # cgroup v1 (or hybrid): the cpu controller's own hierarchy
        quotas += [_v1_quota(directory) for directory in _upwards(root / "cpu", v1)]
    known = [quota for quota in quotas if quota is not None]
    return min(known) if known else None


def _own_paths(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup path in the v2 hierarchy and in v1's cpu controller ("/" when unknown)."""
    v2 = v1 = "/"
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        _id, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":
            v2 = path or "/"
        elif "cpu" in controllers.split(","):
            v1 = path or "/"
    return v2, v1


def _upwards(base: Path, path: str) -> list[Path]:
    """base/path, then each parent up to base (a container sees its own cgroup as the root)."""
    parts = [part for part in path.split("/") if part and part not in (".", "..")]
    return [base.joinpath(*parts[:end]) for end in range(len(parts), -1, -1)]


def _v2_quota(directory: Path) -> float | None:
    """`cpu.max`: "<quota> <period>" in microseconds, or "max <period>" when unlimited."""
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_quota(directory: Path) -> float | None:
    """cgroup v1: `cpu.cfs_quota_us` (-1 = unlimited) over `cpu.cfs_period_us`."""
    try:
        quota = int((directory / "cpu.cfs_quota_us").read_text())
        period = int((directory / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None
