"""`python -m bench [B1 ... B7] [--smoke] [--profile] [--json FILE] [--results FILE|--no-results]`.

With no benchmark named, B1 to B5 and B7 run (that is `make bench`) and `bench/RESULTS.md` gets the
figures (between its `figures` markers; the analysis around them is kept). `--smoke` runs tiny
sizes for a few seconds in all (what `tests/test_bench_smoke.py` does): the figures then mean
nothing, and RESULTS.md is left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.common import Table, machine, machine_line, utc_now
from gitfaas import logs

BENCHMARKS = {
    "B1": "bench.b1_bridge",
    "B2": "bench.b2_consumer",
    "B3": "bench.b3_latency",
    "B4": "bench.b4_memory",
    "B5": "bench.b5_render",
    "B6": "bench.b6_cluster",  # opt-in: a real API server (GITFAAS_TEST_KUBECONFIG...), never in the default set
    "B7": "bench.b7_runs",  # run look-ups (GET /runs) with 100,000 stored requests (issue 15)
}
DEFAULT = ["B1", "B2", "B3", "B4", "B5", "B7"]
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
START, END = "<!-- figures:start -->", "<!-- figures:end -->"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("benchmarks", nargs="*", metavar="B1..B7",
                        help="which to run (default: all but B6, which needs a real cluster: see bench/b6_cluster.py)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmarks run, not speed")
    parser.add_argument("--profile", action="store_true",
                        help="attach py-spy (if installed) to the service under test and print its hot spots")
    parser.add_argument("--client", choices=("auto", "wrk", "aiohttp"), default="auto",
                        help="B1 load generator (auto: wrk when installed, else multi-process aiohttp)")
    parser.add_argument("--json", type=Path, help="also write the tables as JSON here")
    parser.add_argument("--results", type=Path, default=None, help=f"where to write the figures ({RESULTS})")
    parser.add_argument("--no-results", action="store_true", help="do not write RESULTS.md")
    parser.add_argument("--work", type=Path, help="keep logs and stores here instead of a temporary folder")
    args = parser.parse_args(argv)
    names = [name.upper() for name in args.benchmarks] or list(DEFAULT)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.names = names
    return args


async def run_all(args: argparse.Namespace, work: Path) -> tuple[list[Table], list[str], list[str]]:
    tables: list[Table] = []
    profiles: list[str] = []
    failures: list[str] = []
    for name in args.names:
        module = importlib.import_module(BENCHMARKS[name])
        folder = work / name
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        load = load_average()
        print(f"--- {name} running{' (smoke)' if args.smoke else ''} …", file=sys.stderr, flush=True)
        try:
            kwargs = {"smoke": args.smoke, "profile": args.profile, "work": folder}
            if name == "B1":
                kwargs["client"] = args.client
            table = await module.run(**kwargs)
        except Exception:  # noqa: BLE001 — report it, go on with the others
            failures.append(f"{name} failed:\n{traceback.format_exc()}")
            print(failures[-1], file=sys.stderr, flush=True)
            continue
        table.notes.append(f"took {time.monotonic() - started:.0f} s; machine load average before it: {load} "
                           "(other people's work on a shared machine shows up here and as 'other processes')")
        tables.append(table)
        print(table.render(), flush=True)
        profile = getattr(table, "profile", "")
        if profile:
            profiles.append(profile)
            print(profile, flush=True)
    return tables, profiles, failures


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


def write_results(path: Path, tables: list[Table], profiles: list[str]) -> None:
    figures = [START, "", f"Measured {utc_now()} (`date -u`) by `make bench`.", "", machine_line(), ""]
    for table in tables:
        figures.append(table.render())
    for profile in profiles:
        figures.append(profile)
    figures.append(END)
    block = "\n".join(figures)
    if path.exists() and START in path.read_text() and END in path.read_text():
        text = path.read_text()
        before, _, rest = text.partition(START)
        _, _, after = rest.partition(END)
        path.write_text(before + block + after)
    else:
        path.write_text("# Benchmark results (issue #8)\n\n" + block + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logs.configure("ERROR", "console")
    print(machine_line(), flush=True)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
        tables, profiles, failures = asyncio.run(run_all(args, args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="gitfaas-bench-") as tmp:
            tables, profiles, failures = asyncio.run(run_all(args, Path(tmp)))
    if args.json is not None:
        args.json.write_text(json.dumps({"machine": machine(), "date": utc_now(),
                                         "tables": [t.as_json() for t in tables], "failures": failures}, indent=2))
    writes = not args.no_results and not args.smoke and (args.results is not None or len(args.names) == len(DEFAULT))
    if writes and tables:
        target = args.results or RESULTS
        write_results(target, tables, profiles)
        print(f"figures written to {target}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
