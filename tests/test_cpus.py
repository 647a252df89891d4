"""Issue 17: `BRIDGE_WORKERS=auto` (the default) starts as many workers as the CPUs this process may use.

`gitfaas/cpus.py` reads the CPU quota of a cgroup (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`)
from a directory laid out like /sys/fs/cgroup; here that directory is a temporary one.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gitfaas.cpus import cgroup_cpu_quota, usable_cpus
from gitfaas.settings import MAX_AUTO_WORKERS, Settings, SettingsError

ENV = {"KUBE_NAMESPACE": "default"}  # (not read from a service account file)


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def cgroup_v2(root: Path, cpu_max: str) -> Path:
    """A cgroup v2 root holding `cpu.max` (the file a container sees as its own)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "cpu.max").write_text(cpu_max)
    return root


def cgroup_v1(root: Path, quota: str | None, period: str | None) -> Path:
    cpu = root / "cpu"
    cpu.mkdir(parents=True, exist_ok=True)
    if quota is not None:
        (cpu / "cpu.cfs_quota_us").write_text(quota)
    if period is not None:
        (cpu / "cpu.cfs_period_us").write_text(period)
    return root


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """This thread held to one CPU (as taskset or a cpuset would), restored afterwards."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


# ---- cgroup v2: cpu.max -----------------------------------------------------------------------

def test_v2_unlimited_is_no_quota_and_every_allowed_cpu_is_used(tmp_path: Path) -> None:
    root = cgroup_v2(tmp_path, "max 100000\n")
    assert cgroup_cpu_quota(root) is None
    assert usable_cpus(root) == affinity()


def test_v2_a_fractional_quota_rounds_up_but_never_above_the_affinity(tmp_path: Path) -> None:
    root = cgroup_v2(tmp_path, "150000 100000\n")
    assert cgroup_cpu_quota(root) == pytest.approx(1.5)
    assert usable_cpus(root) == min(2, affinity())


def test_v2_half_a_cpu_is_one_worker(tmp_path: Path) -> None:
    root = cgroup_v2(tmp_path, "50000 100000\n")
    assert cgroup_cpu_quota(root) == pytest.approx(0.5)
    assert usable_cpus(root) == 1


def test_v2_a_quota_of_many_cpus_is_held_to_the_affinity(tmp_path: Path) -> None:
    root = cgroup_v2(tmp_path, "6400000 100000\n")  # 64 CPUs' worth
    assert cgroup_cpu_quota(root) == pytest.approx(64.0)
    assert usable_cpus(root) == affinity()


def test_the_affinity_mask_caps_the_count_even_under_a_larger_quota(tmp_path: Path, one_cpu: int) -> None:
    root = cgroup_v2(tmp_path, "400000 100000\n")  # 4 CPUs' worth, but this thread may run on one
    assert usable_cpus(root) == 1
    assert usable_cpus(tmp_path / "no-cgroup-here") == 1


@pytest.mark.parametrize("garbage", ["", "max", "lots 100000", "150000 often", "150000 100000 7", "0 100000",
                                     "-5 100000", "150000 0", "\x00\x01"])
def test_v2_garbage_is_no_quota(tmp_path: Path, garbage: str) -> None:
    root = cgroup_v2(tmp_path, garbage)
    assert cgroup_cpu_quota(root) is None
    assert usable_cpus(root) == affinity()


def test_the_smallest_quota_from_the_own_cgroup_up_to_the_root_counts(tmp_path: Path) -> None:
    """A quota on a parent (a Kubernetes pod, a systemd slice) holds the process as much as its own."""
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    root = cgroup_v2(tmp_path / "fs", "max 100000")
    for path, cpu_max in (("kubepods/pod1", "150000 100000"), ("kubepods/pod1/ctr", "max 100000")):
        (root / path).mkdir(parents=True)
        (root / path / "cpu.max").write_text(cpu_max)
    assert cgroup_cpu_quota(root, proc) == pytest.approx(1.5)
    assert usable_cpus(root, proc) == min(2, affinity())
    (root / "kubepods/pod1/ctr/cpu.max").write_text("50000 100000")  # the own cgroup is tighter still
    assert cgroup_cpu_quota(root, proc) == pytest.approx(0.5)
    assert usable_cpus(root, proc) == 1
    proc.write_text("0::/elsewhere\n")  # another cgroup: the pod's quota does not apply
    assert cgroup_cpu_quota(root, proc) is None


def test_v1_reads_the_cpu_controllers_own_path_and_its_parents(tmp_path: Path) -> None:
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text("4:memory:/other\n3:cpu,cpuacct:/system.slice/gitfaas.service\n0::/\n")
    root = cgroup_v1(tmp_path / "fs", "-1\n", "100000\n")
    service = root / "cpu" / "system.slice" / "gitfaas.service"
    service.mkdir(parents=True)
    (service / "cpu.cfs_quota_us").write_text("250000\n")
    (service / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(root, proc) == pytest.approx(2.5)
    assert usable_cpus(root, proc) == min(3, affinity())
    assert cgroup_cpu_quota(root, tmp_path / "no-such-file") is None  # unknown own path: the root's only


# ---- cgroup v1: cpu/cpu.cfs_quota_us and cpu/cpu.cfs_period_us -------------------------------

def test_v1_minus_one_is_unlimited(tmp_path: Path) -> None:
    root = cgroup_v1(tmp_path, "-1\n", "100000\n")
    assert cgroup_cpu_quota(root) is None
    assert usable_cpus(root) == affinity()


def test_v1_quota_over_period(tmp_path: Path) -> None:
    root = cgroup_v1(tmp_path, "200000\n", "100000\n")
    assert cgroup_cpu_quota(root) == pytest.approx(2.0)
    assert usable_cpus(root) == min(2, affinity())
    root = cgroup_v1(tmp_path / "b", "25000\n", "100000\n")
    assert cgroup_cpu_quota(root) == pytest.approx(0.25)
    assert usable_cpus(root) == 1


@pytest.mark.parametrize(("quota", "period"), [("many", "100000"), ("200000", "soon"), ("200000", None),
                                               ("", "100000"), ("200000", "0")])
def test_v1_garbage_or_a_missing_period_is_no_quota(tmp_path: Path, quota: str, period: str | None) -> None:
    root = cgroup_v1(tmp_path, quota, period)
    assert cgroup_cpu_quota(root) is None
    assert usable_cpus(root) == affinity()


def test_no_cgroup_files_at_all_is_no_quota(tmp_path: Path) -> None:
    assert cgroup_cpu_quota(tmp_path) is None
    assert cgroup_cpu_quota(tmp_path / "does-not-exist") is None
    assert usable_cpus(tmp_path) == affinity()


def test_v2_is_read_before_v1(tmp_path: Path) -> None:
    root = cgroup_v1(cgroup_v2(tmp_path, "100000 100000"), "300000", "100000")
    assert cgroup_cpu_quota(root) == pytest.approx(1.0)


# ---- BRIDGE_WORKERS ---------------------------------------------------------------------------

def test_bridge_workers_auto_is_the_usable_cpus_at_most_eight() -> None:
    expected = min(MAX_AUTO_WORKERS, usable_cpus())
    assert MAX_AUTO_WORKERS == 8
    assert Settings.from_env({**ENV, "BRIDGE_WORKERS": "auto"}).bridge_workers == expected
    assert Settings.from_env({**ENV, "BRIDGE_WORKERS": " AUTO "}).bridge_workers == expected


def test_bridge_workers_defaults_to_auto() -> None:
    expected = min(MAX_AUTO_WORKERS, usable_cpus())
    assert Settings.from_env(ENV).bridge_workers == expected
    assert Settings.from_env({**ENV, "BRIDGE_WORKERS": "  "}).bridge_workers == expected  # blank is unset


def test_bridge_workers_auto_follows_the_affinity(one_cpu: int) -> None:
    assert Settings.from_env({**ENV, "BRIDGE_WORKERS": "auto"}).bridge_workers == 1
    assert Settings.from_env(ENV).bridge_workers == 1


def test_bridge_workers_takes_a_count() -> None:
    assert Settings.from_env({**ENV, "BRIDGE_WORKERS": "3"}).bridge_workers == 3
    assert Settings.from_env({**ENV, "BRIDGE_WORKERS": "1"}).bridge_workers == 1
    assert Settings.from_env({**ENV, "BRIDGE_WORKERS": "12"}).bridge_workers == 12  # only auto is capped


@pytest.mark.parametrize("bad", ["0", "-1", "two", "1.5", "auto2"])
def test_bridge_workers_refuses_what_is_not_a_count(bad: str) -> None:
    with pytest.raises(SettingsError, match="BRIDGE_WORKERS") as refused:
        Settings.from_env({**ENV, "BRIDGE_WORKERS": bad})
    assert repr(bad) in str(refused.value)


def test_the_machine_answer_is_at_least_one_and_at_most_the_affinity() -> None:
    count = usable_cpus()
    assert 1 <= count <= affinity()
    quota = cgroup_cpu_quota()
    if quota is not None:
        assert count == max(1, min(affinity(), math.ceil(quota)))
