"""What the benchmarks share: the machine, tables, child processes and the services they run.

Every service runs as its own process (`python -m cli bridge|consumer`, `python -m
bench.emulator_server`, the wheel's `nats-server`), so the bench process only drives load and
measures. All of them listen on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from gitfaas.embedded import EmbeddedNats, free_port, stop_process

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
TOPIC = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024

# ---- the machine -----------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown CPU"
    for key in ("model name", "Model", "cpu model", "Hardware"):
        match = re.search(rf"^{key}\s*:\s*(.+)$", text, re.M)
        if match:
            return " ".join(match[1].split())
    return platform.processor() or "unknown CPU"


def machine() -> dict[str, Any]:
    try:
        mem_kib = int(re.search(r"^MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)[1])  # type: ignore[index]
    except (OSError, TypeError):
        mem_kib = 0
    return {
        "cores": os.cpu_count() or 1,
        "cpu": cpu_model(),
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }


def machine_line() -> str:
    m = machine()
    return (f"machine: {m['cores']} cores, {m['cpu']} (/proc/cpuinfo), {m['memory_gib']} GiB, "
            f"Python {m['python']}, Linux {m['kernel']}")


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


# ---- tables ----------------------------------------------------------------------------------


@dataclass
class Target:
    text: str  # "bridge ≥ 50% of the raw rate"
    measured: str  # "38%"
    met: bool


@dataclass
class Table:
    key: str  # "B1"
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)  # the headline figures, for JSON/tests
    smoke: bool = False
    profile: str = ""  # py-spy hot spots, when --profile

    def render(self) -> str:
        cells = [[_cell(v) for v in row] for row in self.rows]
        widths = [max(len(str(c)) for c in column) for column in zip(self.columns, *cells, strict=True)]
        lines = [f"### {self.key} — {self.title}" + ("  (SMOKE RUN: tiny sizes, figures not meaningful)"
                                                     if self.smoke else ""),
                 "",
                 machine_line(),
                 "",
                 "| " + " | ".join(c.ljust(w) for c, w in zip(self.columns, widths, strict=True)) + " |",
                 "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        for row in cells:
            lines.append("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        lines.append("")
        for target in self.targets:
            lines.append(f"- target: {target.text} — measured {target.measured} → "
                         f"{'MET' if target.met else 'MISSED'}")
        for note in self.notes:
            lines.append(f"- {note}")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {"key": self.key, "title": self.title, "columns": self.columns,
                "rows": [[_cell(v) for v in row] for row in self.rows],
                "targets": [{"text": t.text, "measured": t.measured, "met": t.met} for t in self.targets],
                "numbers": self.numbers, "notes": self.notes, "smoke": self.smoke}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if value >= 100:
            return f"{value:,.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def quiet_gc() -> None:
    """Before a measured window: collect now and freeze what is left, so that the bench process's own
    full collections (over the documents it prepared) do not show up as service latency."""
    gc.collect()
    gc.freeze()


# ---- /proc -----------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and every live process below it (e.g. bridge workers under their
    supervisor, BRIDGE_WORKERS > 1)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent and child not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(cpu_seconds(member) for member in tree)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) ... of a live process, in KiB."""
    out: dict[str, int] = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for match in re.finditer(r"^(Vm\w+|Rss\w+):\s+(\d+) kB", text, re.M):
        out[match[1]] = int(match[2])
    return out


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (from /proc/stat), summed over cores."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


class CpuMeter:
    """CPU time each named process used between `start()` and `stop()`, as a share of one core;
    `others` is what every other process of the machine used meanwhile (other people's work)."""

    def __init__(self, pids: dict[str, int], trees: frozenset[str] = frozenset()) -> None:
        self.pids = pids
        self.trees = trees  # names whose descendants count too
        self._start: dict[str, float] = {}
        self._machine = 0.0
        self._t0 = 0.0
        self.shares: dict[str, float] = {}
        self.others = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._machine = machine_busy_seconds()
        self._start = {name: self._cpu(name, pid) for name, pid in self.pids.items()}

    def stop(self, extra_seconds: float = 0.0) -> dict[str, float]:
        """`extra_seconds`: CPU time of helpers not in `pids` (e.g. a load generator that has exited)."""
        elapsed = max(1e-9, time.perf_counter() - self._t0)
        self.shares = {name: (self._cpu(name, pid) - self._start[name]) / elapsed for name, pid in self.pids.items()}
        busy = (machine_busy_seconds() - self._machine) / elapsed
        self.others = max(0.0, busy - sum(self.shares.values()) - extra_seconds / elapsed)
        return self.shares

    def _cpu(self, name: str, pid: int) -> float:
        return tree_cpu_seconds(pid) if name in self.trees else cpu_seconds(pid)

    def text(self, extra: dict[str, float] | None = None) -> str:
        shares = {**self.shares, **(extra or {}), "other processes": self.others}
        return ", ".join(f"{name} {share * 100:.0f}%" for name, share in shares.items())


# ---- child processes -------------------------------------------------------------------------


class Child:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Child:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(self.argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, timeout: float = 10.0) -> None:
        await stop_process(self.process, timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


async def wait_until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str,
                     interval: float = 0.05, alive: Iterable[Child] = ()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for child in alive:
            child.check_alive()
        if await condition():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def http_ok(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as response:
            await response.read()
            return response.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


# ---- the pipeline repository ------------------------------------------------------------------

# A realistic pipeline step: 60 lines, 6 variables (RANDOM, body.file.name, MESSAGE, REQUEST_ID,
# FUNCTION_UID, BRIDGE_URL). Used by every benchmark, so B5's per-message cost is what B2-B4 pay.
JOB_MANIFEST = """\
# A pipeline step as a team would write it: convert one uploaded file to parquet.
apiVersion: batch/v1
kind: Job
metadata:
  name: convert-{{RANDOM}}
  labels:
    app.kubernetes.io/name: convert
    app.kubernetes.io/part-of: pipeline
    pipeline.example.com/stage: convert
  annotations:
    pipeline.example.com/source: "{{ body.file.name }}"
spec:
  backoffLimit: 2
  activeDeadlineSeconds: 600
  ttlSecondsAfterFinished: 3600
  template:
    metadata:
      labels:
        app.kubernetes.io/name: convert
    spec:
      restartPolicy: Never
      serviceAccountName: pipeline-runner
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        fsGroup: 1000
      containers:
        - name: convert
          image: registry.example.com/pipeline/convert:1.4.2
          command: ["python3", "/app/convert.py"]
          args: ["--input", "/data/{{ body.file.name }}", "--format", "parquet"]
          env:
            - name: MESSAGE
              value: "{{MESSAGE}}"
            - name: REQUEST_ID
              value: "{{REQUEST_ID}}"
            - name: FUNCTION_UID
              value: "{{FUNCTION_UID}}"
            - name: BRIDGE_URL
              value: "{{BRIDGE_URL}}"
            - name: LOG_LEVEL
              value: info
          resources:
            requests:
              cpu: 250m
              memory: 256Mi
            limits:
              cpu: "1"
              memory: 512Mi
          volumeMounts:
            - name: data
              mountPath: /data
            - name: scratch
              mountPath: /tmp
      volumes:
        - name: data
          persistentVolumeClaim:
            claimName: pipeline-data
        - name: scratch
          emptyDir: {}
"""


def make_repo(path: Path) -> Path:
    """A plain directory (GIT_URL may be one): config.json with topic `bench` → job.yaml."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"topics": [{"name": TOPIC, "configs": ["job.yaml"]}]}))
    (path / "job.yaml").write_text(JOB_MANIFEST)
    return path


def body(index: int, size: int = 1024) -> bytes:
    """A 1 KiB JSON message naming a file (the manifest reads `body.file.name`)."""
    head = {"file": {"name": f"run-{index:07d}.csv.gz"}, "rows": 5000, "pad": ""}
    raw = json.dumps(head, separators=(",", ":"))
    return json.dumps({**head, "pad": "x" * max(0, size - len(raw))}, separators=(",", ":")).encode()


# ---- the services ----------------------------------------------------------------------------


@dataclass
class Emulator:
    child: Child
    url: str
    kubeconfig: Path
    stats_url: str

    async def stats(self, http: aiohttp.ClientSession) -> dict[str, Any]:
        async with http.get(self.stats_url) as response:
            return await response.json()


EMULATOR_GC = os.environ.get("BENCH_EMULATOR_GC", "freeze")


async def start_emulator(work: Path, http: aiohttp.ClientSession, name: str = "emulator") -> Emulator:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    ready = folder / "ready.json"
    ready.unlink(missing_ok=True)  # a kept --work folder may hold the last run's
    child = Child(name, [PYTHON, "-m", "bench.emulator_server", "--dir", str(folder), "--gc", EMULATOR_GC],
                  folder / "emulator.log")
    child.start()

    async def written() -> bool:
        return ready.exists()

    await wait_until(written, 30, f"{name} to start ({child.log_path})", alive=[child])
    info = json.loads(ready.read_text())
    return Emulator(child, info["url"], Path(info["kubeconfig"]), info["stats_url"])


@dataclass
class Service:
    child: Child
    url: str  # bridge: its base URL; consumer: its health/metrics base URL

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 30) -> None:
        async def ok() -> bool:
            return await http_ok(http, self.url + "/readyz")

        await wait_until(ok, timeout, f"{self.child.name} to be ready ({self.child.log_path})", alive=[self.child])


def service_env(nats_url: str, **extra: str) -> dict[str, str]:
    env = {"NATS_URL": nats_url, "LOG_FORMAT": "json", "LOG_LEVEL": "INFO", "PYTHONUNBUFFERED": "0"}
    env.update(extra)
    return env


def start_bridge(work: Path, nats_url: str, name: str = "bridge", workers: str = "1") -> Service:
    """`workers`: BRIDGE_WORKERS. One unless a benchmark is about workers: the others measure one process."""
    port = free_port()
    child = Child(name, [PYTHON, "-m", "cli", "bridge"], work / f"{name}.log",
                  service_env(nats_url, BRIDGE_HOST="127.0.0.1", BRIDGE_PORT=str(port), BRIDGE_WORKERS=workers))
    child.start()
    return Service(child, f"http://127.0.0.1:{port}")


def start_consumer(work: Path, nats_url: str, repo: Path, kubeconfig: Path, bridge_url: str,
                   max_concurrency: int = 32, name: str = "consumer") -> Service:
    port = free_port()
    child = Child(name, [PYTHON, "-m", "cli", "consumer"], work / f"{name}.log", service_env(
        nats_url, GIT_URL=str(repo), GIT_CACHE_DIR=str(work / f"{name}-git-cache"), GIT_POLL_SECONDS="0",
        EXECUTOR="kubernetes", KUBECONFIG=str(kubeconfig), KUBE_NAMESPACE="default",
        CONSUMER_HOST="127.0.0.1", CONSUMER_HTTP_PORT=str(port), BRIDGE_URL=bridge_url,
        MAX_CONCURRENCY=str(max_concurrency)))
    child.start()
    return Service(child, f"http://127.0.0.1:{port}")


_APPLIED = re.compile(r'^gitfaas_consumer_messages_total\{[^}]*outcome="applied"[^}]*\} (\S+)$', re.M)
_OTHER_OUTCOMES = re.compile(r'^gitfaas_consumer_messages_total\{[^}]*outcome="(dead|retried)"[^}]*\} (\S+)$', re.M)


async def consumer_counts(http: aiohttp.ClientSession, consumer: Service) -> dict[str, int]:
    """Messages the consumer process applied / gave up on / retried, from its own /metrics."""
    try:
        async with http.get(consumer.url + "/metrics", timeout=aiohttp.ClientTimeout(total=5)) as response:
            text = await response.text()
    except (aiohttp.ClientError, TimeoutError):
        return {"applied": -1}
    counts = {"applied": int(sum(float(v) for v in _APPLIED.findall(text)))}
    for outcome, value in _OTHER_OUTCOMES.findall(text):
        counts[outcome] = counts.get(outcome, 0) + int(float(value))
    return counts


@contextlib.asynccontextmanager
async def nats_server(work: Path) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(work / "nats")
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def nats_pid(server: EmbeddedNats) -> int:
    assert server.process is not None
    return server.process.pid


@contextlib.asynccontextmanager
async def children(*items: Child) -> AsyncIterator[None]:
    """Stop the given children on the way out, whatever happens."""
    try:
        yield
    finally:
        await asyncio.gather(*(child.stop() for child in items), return_exceptions=True)


# ---- profiling (optional: py-spy in the venv) ---------------------------------------------------


def py_spy() -> str | None:
    beside = Path(PYTHON).parent / "py-spy"
    if beside.exists():
        return str(beside)
    from shutil import which

    return which("py-spy")


class Profiler:
    """`py-spy record` attached to a process for a while; `top()` gives its hottest functions."""

    def __init__(self, pid: int, out: Path, seconds: float, rate: int = 200, subprocesses: bool = False) -> None:
        """`subprocesses`: the process's children too (the bridge's workers), their samples added up."""
        self.pid, self.out, self.seconds, self.rate = pid, out, seconds, rate
        self.subprocesses = subprocesses
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        binary = py_spy()
        if binary is None:
            return False
        self.process = subprocess.Popen(
            [binary, "record", "-p", str(self.pid), "-d", str(max(1, round(self.seconds))), "-r", str(self.rate),
             "-f", "raw", "-o", str(self.out), "--gil", "--nonblocking",
             *(["--subprocesses"] if self.subprocesses else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return True

    async def wait(self) -> None:
        if self.process is not None:
            await asyncio.to_thread(self.process.wait)

    def top(self, count: int = 15) -> list[tuple[str, float, float]]:
        """(function, self share, inclusive share) of the samples, hottest self time first."""
        return top_functions(self.out, count)


def _samples(path: Path) -> tuple[dict[str, int], dict[str, int], int]:
    """py-spy's collapsed stacks → (own samples, inclusive samples, total) per function."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return own, inclusive, total
    for line in lines:
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        frames = [_frame(f) for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples = int(number)
        total += samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    return own, inclusive, total


def top_functions(path: Path, count: int = 15) -> list[tuple[str, float, float]]:
    """(function, own share, inclusive share), hottest own time first."""
    own, inclusive, total = _samples(path)
    if not total:
        return []
    ranked = sorted(own.items(), key=lambda kv: kv[1], reverse=True)[:count]
    return [(name, samples / total, inclusive[name] / total) for name, samples in ranked]


def top_inclusive(path: Path, count: int = 15, contains: str = "") -> list[tuple[str, float]]:
    """Functions by inclusive share (optionally only those whose name contains `contains`)."""
    _own, inclusive, total = _samples(path)
    if not total:
        return []
    ranked = sorted(((n, s) for n, s in inclusive.items() if contains in n), key=lambda kv: kv[1], reverse=True)
    return [(name, samples / total) for name, samples in ranked[:count]]


def _frame(frame: str) -> str:
    """`publish (bridge/app.py:212)` → `publish (bridge/app.py)`: merge the lines of one function."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        path = path.replace(str(ROOT) + "/", "")
    return f"{name} ({path})"


def profile_text(title: str, profiler: Profiler, count: int = 12) -> str:
    rows = profiler.top(count)
    if not rows:
        return f"{title}: no samples (is py-spy allowed to attach?)\n"
    lines = [f"{title} — py-spy, hottest functions by own time (share of the process's busy samples):",
             "", "| own | incl. | function |", "|---:|---:|---|"]
    lines += [f"| {own * 100:.1f}% | {incl * 100:.1f}% | `{name}` |" for name, own, incl in rows]
    return "\n".join(lines) + "\n"


async def timed_apply_loop(kubeconfig: str, documents: list[dict[str, Any]], work: Path, *, namespace: str,
                           concurrency: int, request_timeout: float) -> float:
    """The baseline of B2 and B6: a bare server-side apply of every document, `concurrency` at a time,
    through the same dynamic client the consumer uses; returns the seconds it took."""
    from kubernetes_asyncio import client as k8s_client
    from kubernetes_asyncio import config as k8s_config
    from kubernetes_asyncio.dynamic import DynamicClient

    configuration = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    async with k8s_client.ApiClient(configuration) as api:
        dynamic = await DynamicClient(api, cache_file=str(work / "baseline-discovery.json"))
        jobs = await dynamic.resources.get(api_version="batch/v1", kind="Job")
        pending = iter(documents)

        async def worker() -> None:
            for document in pending:
                response = await dynamic.server_side_apply(
                    jobs, body=document, name=document["metadata"]["name"], namespace=namespace,
                    field_manager="gitfaas", force_conflicts=True, serialize=False, _request_timeout=request_timeout)
                async with response:
                    await response.read()
                    if not 200 <= response.status <= 299:
                        raise RuntimeError(f"apply answered {response.status}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - started
