"""The `gitfaas` command. The top layer: it wires the services together, and nothing imports it."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from importlib import metadata
from pathlib import Path
from typing import Any

from cli import output
from gitfaas import fast, logs, settings_doc
from gitfaas.publishing import WAITS
from gitfaas.settings import Settings, SettingsError

EXAMPLES = """\
examples:
  gitfaas up --repo examples/pipeline        # everything on this machine
  GIT_URL=https://github.com/me/pipes.git gitfaas consumer
  gitfaas bridge                             # HTTP on :5000 (BRIDGE_PORT)
"""


def _run(main: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Run until done or until asked to stop, then let the coroutine clean up.

    Asked to stop: SIGINT (Ctrl-C), SIGTERM, SIGHUP (terminal closed), or standard output/error
    gone (`cli.output`). The coroutine is cancelled once; a second request (Ctrl-C again, the
    pipe breaking during the shutdown) must not cancel its clean-up half-way.
    """

    async def runner() -> None:
        task = asyncio.ensure_future(main())
        loop = asyncio.get_running_loop()
        stopping = False

        def stop() -> None:
            nonlocal stopping
            if not stopping:
                stopping = True
                task.cancel()

        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(sig, stop)
        output.on_lost(lambda: loop.call_soon_threadsafe(stop))
        with contextlib.suppress(asyncio.CancelledError):
            await task

    fast.run(runner())  # uvloop when the `fast` extra is installed, else asyncio's loop
    return 0


def _settings() -> Settings:
    try:
        return Settings.from_env()
    except SettingsError as exc:
        print(f"gitfaas: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _nats_of_running_up(settings: Settings) -> Settings:
    """Without NATS_URL, the commands talk to the `gitfaas up` running on the state directory."""
    if settings.nats_url_given:
        return settings
    from gitfaas.statedir import running_up

    running = running_up(settings.state_dir)
    return settings.replace(nats_url=running.nats_url) if running and running.nats_url else settings


def _once(coroutine: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coroutine)


def _params(pairs: list[str]) -> list[tuple[str, str]]:
    out = []
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            print(f"gitfaas: -p takes name=value, not {pair!r}", file=sys.stderr)
            raise SystemExit(2)  # a usage error, like argparse's own
        out.append((name, value))
    return out


def _body(data: str | None) -> bytes:
    """A body given on the command line, or standard input for `-`."""
    return sys.stdin.buffer.read() if data == "-" else (data or "").encode()


# Each command takes the parsed arguments and the settings (parsed once, in `main`).

def cmd_bridge(args: argparse.Namespace, settings: Settings) -> int:
    from bridge.app import run

    return _run(lambda: run(settings, worker=args.worker))


def cmd_consumer(_args: argparse.Namespace, settings: Settings) -> int:
    from consumer.service import run

    return _run(lambda: run(settings))


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from cli.up import UpRefused, claim_state_dir, up

    port = settings.bridge_port if args.port is None else args.port
    try:
        with claim_state_dir(Path(args.state_dir or settings.state_dir), port) as lock:
            return _run(lambda: up(settings, lock, repo=args.repo, executor=args.executor, port=port))
    except UpRefused as exc:
        print(f"gitfaas up: {exc}", file=sys.stderr)
        return 1


def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    from cli.operator import replay

    if not args.request_id and not args.topic:
        print("gitfaas replay: give a REQUEST_ID or --topic T", file=sys.stderr)
        return 2
    try:
        return _once(replay(settings, args.request_id, args.topic, args.since, args.failed))
    except ValueError as exc:
        print(f"gitfaas replay: {exc}", file=sys.stderr)
        return 2


def _confirm_purge(count: int) -> bool:
    """Purging cannot be undone: ask a person, and refuse when nobody is there to answer."""
    question = f"purge {count} dead letter(s)? They cannot be redriven afterwards. [y/N] "
    if not sys.stdin.isatty():
        print(f"gitfaas dead purge: {count} dead letter(s) would be deleted for good; "
              "add --yes to confirm (standard input is not a terminal to ask)", file=sys.stderr)
        return False
    try:
        return input(question).strip().lower() in ("y", "yes")
    except EOFError:
        return False


def cmd_dead(args: argparse.Namespace, settings: Settings) -> int:
    from cli.operator import dead

    return _once(dead(settings, args.action, args.seq, args.all, args.json,
                      confirm=None if args.yes else _confirm_purge))


def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from cli.operator import publish

    return _once(publish(settings, args.topic, _body(args.data), _params(args.param), args.wait, args.timeout))


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from cli.operator import status

    return _once(status(settings, args.request_id, args.json, args.tree))


def cmd_runs(args: argparse.Namespace, settings: Settings) -> int:
    from cli.runs import runs
    from gitfaas.timespec import parse_since

    try:
        since = parse_since(args.since, "--since") if args.since else None
    except ValueError as exc:
        print(f"gitfaas runs: {exc}", file=sys.stderr)
        return 2
    return _once(runs(settings, args.topic, args.state, since, args.limit, args.json))


def cmd_logs(args: argparse.Namespace, settings: Settings) -> int:
    from cli.runs import logs

    return _once(logs(settings, args.id, args.run, args.follow))


def cmd_cancel(args: argparse.Namespace, settings: Settings) -> int:
    from cli.runs import cancel

    return _once(cancel(settings, args.id))


def cmd_validate(args: argparse.Namespace, settings: Settings) -> int:
    from cli.authoring import validate

    return validate(settings, args.repo, cluster=args.cluster, kubernetes_version=args.kubernetes_version)


def cmd_render(args: argparse.Namespace, settings: Settings) -> int:
    from cli.authoring import render

    return render(settings, args.repo, args.topic, _body(args.message), dict(_params(args.param)))


SERVICES = frozenset({"up", "bridge", "consumer"})  # log at LOG_LEVEL; the tools only warn


def _version() -> str:
    try:
        return metadata.version("gitfaas")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gitfaas",
        description="GitOps functions-as-a-service: publish a topic, gitfaas applies its manifests.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gitfaas {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run NATS, the bridge and the consumer on this machine",
                        description="Start an embedded nats-server (state under .gitfaas/), the bridge "
                                    "and the consumer in one process tree. Ctrl-C stops everything.",
                        epilog="example:\n  gitfaas up --repo examples/pipeline --port 5000",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--repo", default=os.environ.get("GIT_URL") or ".",
                    help="repository: local directory, file://, https or ssh URL (default: GIT_URL or .)")
    up.add_argument("--executor", choices=["local", "dry-run", "kubernetes"], default=None,
                    help="how documents are applied (default: local — Jobs run as processes here)")
    up.add_argument("--port", type=int, default=None, help="bridge HTTP port (default 5000; make up PORT=5001)")
    up.add_argument("--state-dir", default=None,
                    help="where NATS, volumes and run records live; one gitfaas up each "
                         "(default GITFAAS_STATE_DIR or .gitfaas)")
    up.set_defaults(func=cmd_up)

    bridge = sub.add_parser("bridge", help="run the HTTP bridge (configured by environment variables)",
                            description="The HTTP edge: validates, publishes to JetStream, answers.",
                            epilog=settings_doc.help_text(settings_doc.BRIDGE),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    # Started by the supervisor of BRIDGE_WORKERS (bridge/workers.py).
    bridge.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    bridge.set_defaults(func=cmd_bridge)
    consumer = sub.add_parser("consumer", help="run the consumer (configured by environment variables)",
                              description="Keeps the repository in sync, renders and applies each message.",
                              epilog=settings_doc.help_text(settings_doc.CONSUMER),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    consumer.set_defaults(func=cmd_consumer)

    publish = sub.add_parser(
        "publish", help="publish a message on a topic straight to NATS, like the bridge does",
        epilog="examples:\n  gitfaas publish timeToCollect 'hello'\n"
               "  echo '{\"rows\": 20}' | gitfaas publish timeToCollect - --wait",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_argument("topic")
    publish.add_argument("data", nargs="?", default="", help="the body; - reads standard input")
    publish.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                         help="a template parameter (repeatable)")
    publish.add_argument("--wait", nargs="?", const="applied", choices=[*WAITS, "run"], metavar="STATE",
                         help=f"wait until the request is {' or '.join(WAITS)}, or (run) until the whole run it "
                              "starts is finished (alone: applied; put it after DATA) and print its status; exit 0 "
                              "only if it got there, 1 if it ended failed, dead or cancelled, 3 at the timeout")
    publish.add_argument("--timeout", type=float, default=60.0, help="seconds --wait waits (default 60)")
    publish.set_defaults(func=cmd_publish)

    status = sub.add_parser(
        "status", help="a request's status document, readable",
        epilog="examples:\n  gitfaas status 3f0c2a9e-…\n  gitfaas status 3f0c2a9e-… --tree\n"
               "  gitfaas status 3f0c2a9e-… --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    status.add_argument("request_id", help="a request id, or a unique prefix of at least 8 characters")
    status.add_argument("--json", action="store_true", help="print the JSON document")
    status.add_argument("--tree", action="store_true",
                        help="the whole run it belongs to: every request, its state, timestamps and duration")
    status.set_defaults(func=cmd_status)

    runs = sub.add_parser(
        "runs", help="recent runs (a root request and everything published under it), newest first",
        epilog="examples:\n  gitfaas runs\n  gitfaas runs --topic timeToCollect --state failed --since 1d",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    runs.add_argument("--topic", help="only runs started on this topic")
    runs.add_argument("--state", choices=["running", "succeeded", "failed", "cancelled"],
                      help="only runs in this state")
    runs.add_argument("--since", help="only runs started since (30m, 1h, 2d or an ISO time)")
    runs.add_argument("--limit", type=int, default=20, help="at most this many (default 20)")
    runs.add_argument("--json", action="store_true", help="print JSON")
    runs.set_defaults(func=cmd_runs)

    logs_ = sub.add_parser(
        "logs", help="the output of a request's Jobs (--run: of the whole run), each line prefixed by its Job",
        epilog="examples:\n  gitfaas logs 3f0c2a9e\n  gitfaas logs 3f0c2a9e --run --follow",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    logs_.add_argument("id", help="a request id, or a unique prefix of at least 8 characters")
    logs_.add_argument("--run", action="store_true", help="every Job of the run the request belongs to")
    logs_.add_argument("--follow", "-f", action="store_true", help="keep printing new output until it is finished")
    logs_.set_defaults(func=cmd_logs)

    cancel = sub.add_parser(
        "cancel", help="cancel a run: its unfinished requests become cancelled, its active Jobs are deleted",
        epilog="examples:\n  gitfaas cancel 3f0c2a9e      # the run, or the run a request belongs to",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    cancel.add_argument("id", help="a run or request id, or a unique prefix of at least 8 characters")
    cancel.set_defaults(func=cmd_cancel)

    validate = sub.add_parser(
        "validate", help="check a pipeline repository as the consumer would; exit 1 listing every problem",
        epilog="examples:\n  gitfaas validate examples/pipeline\n  BANNED_KINDS='Secret Role' gitfaas validate .\n"
               "  KUBECONFIG=~/.kube/config KUBE_NAMESPACE=gitfaas gitfaas validate --cluster .",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    validate.add_argument("repo", nargs="?", default=os.environ.get("GIT_URL") or ".",
                          help="directory (checked as it is on disk) or git URL (default: GIT_URL or .)")
    validate.add_argument("--cluster", action="store_true",
                          help="also send every document as a server-side dry-run apply to the cluster of "
                               "KUBECONFIG (or the pod's service account): what the API server itself refuses")
    validate.add_argument("--kubernetes-version", metavar="X.Y", default=None,
                          help="the Kubernetes version whose schemas documents are checked against "
                               "(default: the newest bundled by kubernetes-validate)")
    validate.set_defaults(func=cmd_validate)

    render = sub.add_parser(
        "render", help="print the documents a message on TOPIC would apply",
        epilog="examples:\n  gitfaas render timeToCollect --repo examples/pipeline --message hello\n"
               "  gitfaas render timeToCollect --repo examples/pipeline --message '{\"rows\": 5}' -p who=me",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    render.add_argument("topic")
    render.add_argument("--repo", default=os.environ.get("GIT_URL") or ".", help="directory or git URL")
    render.add_argument("--message", default="", help="the message body; - reads standard input")
    render.add_argument("-p", "--param", action="append", default=[], metavar="NAME=VALUE",
                        help="a template parameter (repeatable)")
    render.set_defaults(func=cmd_render)

    replay = sub.add_parser(
        "replay", help="publish stored messages again as new requests linked to the originals",
        epilog="examples:\n  gitfaas replay 3f0c2a9e-…\n  gitfaas replay --topic timeToCollect --since 1h --failed",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    replay.add_argument("request_id", nargs="?", help="the request to replay")
    replay.add_argument("--topic", help="replay every message of this topic…")
    replay.add_argument("--since", default="1h", help="…stored since this long ago (30m, 1h, 2d) or ISO time")
    replay.add_argument("--failed", action="store_true", help="…whose request failed or went dead")
    replay.set_defaults(func=cmd_replay)

    dead = sub.add_parser(
        "dead", help="the dead letters: what failed and why, and sending them through again",
        epilog="examples:\n  gitfaas dead list\n  gitfaas dead show 12\n  gitfaas dead redrive 12\n"
               "  gitfaas dead redrive --all\n  gitfaas dead purge --yes",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    dead.add_argument("action", choices=["list", "show", "redrive", "purge"])
    dead.add_argument("seq", nargs="?", type=int, help="dead letter sequence (show, redrive)")
    dead.add_argument("--all", action="store_true", help="redrive every dead letter")
    dead.add_argument("--json", action="store_true", help="list as JSON")
    dead.add_argument("--yes", action="store_true", help="purge without asking")
    dead.set_defaults(func=cmd_dead)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVICES:
        output.guard()  # before the loggers keep a reference to sys.stdout/sys.stderr
    settings = _settings()
    if args.command not in SERVICES:
        settings = _nats_of_running_up(settings)
    logs.configure(settings.log_level if args.command in SERVICES else "WARNING", settings.log_format)
    func: Callable[[argparse.Namespace, Settings], int] = args.func
    return func(args, settings)

