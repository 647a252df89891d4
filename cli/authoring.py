"""`gitfaas validate` and `gitfaas render`: check a pipeline repository before pushing it.

Both use the consumer's own loading and rendering code, so a repository that validates here
loads in the consumer, and `render` prints exactly what the consumer would apply.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from difflib import get_close_matches
from pathlib import Path
from typing import Any, TextIO

import yaml

from consumer.checks import dry_run_report, rule_problems, schema_problems
from consumer.configuration import Configuration, ConfigurationError, Topic, load_configuration
from consumer.documents import Request, render_request
from consumer.errors import PermanentError
from consumer.executors.base import NoJobEvents
from consumer.executors.kubernetes import KubernetesExecutor
from consumer.gitsync import GitSync, GitSyncError, content_hash
from consumer.locate import ManifestLines
from consumer.prepare import PolicyError, Stamp, prepare
from consumer.render import CompiledDocument, RenderError
from consumer.variables import MessageValues
from gitfaas.publishing import TopicParameters, is_parameter
from gitfaas.settings import Settings
from gitfaas.subjects import BUILTIN_VARIABLES, new_request_id

SAMPLE = "sample"


def _snapshot(settings: Settings, repo: str) -> tuple[Path, str]:
    """A directory is checked as it is on disk (what you are about to commit); a URL is cloned."""
    local = Path(repo).expanduser()
    if local.is_dir():
        return local.resolve(), content_hash(local)
    cache = tempfile.mkdtemp(prefix="gitfaas-validate-")
    snapshot = GitSync(settings.replace(git_url=repo, git_cache_dir=cache)).sync()
    return snapshot.root, snapshot.commit


def load(settings: Settings, repo: str) -> Configuration:
    return load_with_root(settings, repo)[0]


def load_with_root(settings: Settings, repo: str) -> tuple[Configuration, Path]:
    root, commit = _snapshot(settings, repo)
    return load_configuration(root, commit, settings), root


class _Lines:
    """Line lookups in the repository's manifest files, each file read once (only when needed)."""

    def __init__(self, root: Path | None) -> None:
        self.root = root
        self.files: dict[str, ManifestLines | None] = {}

    def of(self, source: str) -> ManifestLines | None:
        if source not in self.files:
            try:
                text = (self.root / source).read_text("utf-8") if self.root is not None else None
            except (OSError, UnicodeDecodeError):
                text = None
            self.files[source] = ManifestLines(text) if text is not None else None
        return self.files[source]

    def key(self, doc: CompiledDocument, path: tuple[str, ...] | None) -> int:
        found = self.of(doc.source)
        return found.key_line(doc.index, path, doc.line) if found is not None and path else doc.line

    def variable(self, doc: CompiledDocument, name: str) -> int:
        found = self.of(doc.source)
        return found.variable_line(doc.index, name, doc.line) if found is not None else doc.line


def sample_problems(settings: Settings, config: Configuration, root: Path | None = None,
                    warnings: list[str] | None = None, kubernetes_version: str | None = None,
                    kubernetes: bool = True) -> list[str]:
    """What the consumer would refuse once messages arrive, found now: every document rendered with
    sample values and checked against policy, the Kubernetes schemas of `kubernetes_version` and the
    rules the schemas miss (`consumer.checks`), and every variable's name checked for a misspelling.

    With the repository's `root`, each problem names the line of the offending key or variable.
    `kubernetes=False` leaves out the schemas and the rules (what gitfaas itself checks, alone).
    Parameters no built-in or `params` entry declares are added to `warnings` (when given).
    """
    problems: list[str] = []
    lines = _Lines(root)
    for topic in config.topics.values():
        values = MessageValues(request_id="validate", identity="validate", topic=topic.name, body=b"{}",
                               params=topic.defaults, nats_url=settings.nats_url, bridge_url=settings.bridge_url)
        stamp = Stamp(topic=topic.name, request_id="validate", stream_seq=0, commit=config.commit,
                      identity="validate")
        reported: set[tuple[str, str]] = set()
        for ordinal, doc in enumerate(topic.documents):
            for name in sorted(doc.variables, key=lambda name: (lines.variable(doc, name), name)):
                if (doc.source, name) in reported:
                    continue
                reported.add((doc.source, name))
                where = f"{doc.source}:{lines.variable(doc, name)}: topic {topic.name}"
                misspelled, undeclared = _check_name(name, topic)
                if misspelled:
                    problems.append(f"{where}: {misspelled}")
                elif undeclared and warnings is not None:
                    warnings.append(f"{where}: {undeclared}")
            known = {name: values.value(name, ordinal) for name in doc.variables}
            sample = {name: value if value is not None else SAMPLE for name, value in known.items()}
            try:
                rendered = prepare(doc.render(sample), ordinal=ordinal, stamp=stamp,
                                   namespace=topic.namespace or settings.kube_namespace, settings=settings)
            except PolicyError as exc:
                problems.append(f"{doc.source}:{lines.key(doc, exc.path)}: topic {topic.name}: {exc}")
                continue
            except RenderError as exc:
                problems.append(f"{doc.source}:{doc.line}: topic {topic.name}: {exc}")
                continue
            if not kubernetes:
                continue
            uses_sample = any(value is None for value in known.values())
            found, cautions = _kubernetes_problems(rendered, kubernetes_version, uses_sample)
            problems += [f"{doc.source}:{lines.key(doc, path)}: topic {topic.name}: {text}" for path, text in found]
            if warnings is not None:
                warnings += [f"{doc.source}:{lines.key(doc, path)}: topic {topic.name}: {text}"
                             for path, text in cautions]
    return problems


Located = list[tuple[tuple[Any, ...], str]]


def _kubernetes_problems(document: dict[str, Any], version: str | None, uses_sample: bool) -> tuple[Located, Located]:
    """(problems, warnings), each with its key path: what the API server would refuse in one rendered
    document (the rules the schemas miss, then the schema of its kind)."""
    kind, name = document.get("kind"), (document.get("metadata") or {}).get("name")
    found: Located = [(path, text) for path, text in rule_problems(document)]
    cautions: Located = []
    schema, unchecked = schema_problems(document, version)
    if unchecked:
        cautions.append(((), f"{kind} {name}: schema not checked: {unchecked}"))
    for path, text, value in schema:
        where = tuple(int(part) if part.isdigit() else part for part in path)
        sentence = f"{kind} {name} does not match the Kubernetes schema: {text}"
        if uses_sample and isinstance(value, str) and SAMPLE in value:
            # A parameter without a default: its real values may well fit.
            cautions.append((where, f"{sentence} (with the sample value {SAMPLE!r} for a parameter without a default)"))
        else:
            found.append((where, sentence))
    return found, cautions


def _check_name(name: str, topic: Topic) -> tuple[str | None, str | None]:
    """(a misspelling, else an undeclared parameter) for one `{{NAME}}`; (None, None) when it is fine.

    A name close to a built-in (`MESAGE`, `request_id`) or to a declared parameter is almost surely a
    typo: as a parameter, every message would have to give it, and none does.
    """
    if not is_parameter(name) or name in topic.params:
        return None, None
    close = (get_close_matches(name.upper(), sorted(BUILTIN_VARIABLES), n=1, cutoff=0.75)
             or get_close_matches(name, sorted(topic.params), n=1, cutoff=0.75))
    if close:
        return (f"{{{{{name}}}}} is neither a built-in variable nor a parameter declared in the topic's "
                f'"params"; did you mean {close[0]}?'), None
    return None, (f"{{{{{name}}}}} is a parameter every message must give (it is not a built-in variable and "
                  f'the topic\'s "params" does not declare it); declare it in "params" with a default, '
                  "or null if every message must give it")


def describe_parameters(topic: Topic) -> str | None:
    """`parameters replicas="1" (default), size (required)`: what a message on the topic may give."""
    needs = TopicParameters.of(topic.name, topic.variables, topic.params)
    names = sorted(needs.required | needs.defaults.keys())
    if not names:
        return None
    return "parameters " + ", ".join(
        f"{name}={json.dumps(needs.defaults[name])} (default)" if name in needs.defaults else f"{name} (required)"
        for name in names)


def validate(settings: Settings, repo: str, out: TextIO = sys.stdout, *, cluster: bool = False,
             kubernetes_version: str | None = None, kubernetes: bool = True) -> int:
    """`gitfaas validate`; `kubernetes=False` leaves the schemas and rules out (see `sample_problems`)."""
    warnings: list[str] = []
    try:
        config, root = load_with_root(settings, repo)
    except ConfigurationError as exc:
        problems = exc.problems
    except GitSyncError as exc:
        problems = [str(exc)]
    else:
        try:
            problems = sample_problems(settings, config, root, warnings, kubernetes_version, kubernetes)
        except ValueError as exc:  # e.g. a Kubernetes version kubernetes-validate has no schemas for
            print(f"gitfaas validate: {getattr(exc, 'message', None) or exc}", file=sys.stderr)
            return 2
        if cluster and not problems:
            found, cluster_warnings, unchecked = asyncio.run(_cluster_report(settings, config))
            problems += found
            warnings += cluster_warnings
            if unchecked:
                print(f"gitfaas validate: the cluster could not check everything: {unchecked}", file=sys.stderr)
                for warning in warnings:
                    print(f"warning: {warning}", file=out)
                for problem in problems:
                    print(problem, file=out)
                return 1
        for warning in warnings:
            print(f"warning: {warning}", file=out)
        if not problems:
            documents = sum(len(t.documents) for t in config.topics.values())
            print(f"ok: {len(config.topics)} topic(s), {documents} document(s) in {repo}", file=out)
            for topic in config.topics.values():
                if described := describe_parameters(topic):
                    print(f"  {topic.name}: {described}", file=out)
            return 0
    for problem in problems:
        print(problem, file=out)
    print(f"{len(problems)} problem(s) in {repo}", file=out)
    return 1


async def _cluster_report(settings: Settings, config: Configuration) -> tuple[list[str], list[str], str | None]:
    """Server-side dry-run applies of every document, as the consumer's own executor sends them."""
    executor = KubernetesExecutor(settings.replace(executor="kubernetes"))
    try:
        await executor.start(NoJobEvents(), watch_jobs=False)
    except Exception as exc:  # noqa: BLE001 — no kubeconfig, cluster unreachable…: one line
        return [], [], f"{type(exc).__name__}: {exc}"
    try:
        return await dry_run_report(settings, config, executor)
    finally:
        await executor.close()


def render(settings: Settings, repo: str, topic: str, message: bytes, params: dict[str, str],
           out: TextIO = sys.stdout) -> int:
    try:
        config = load(settings, repo)
        if (found := config.topics.get(topic)) is not None:
            # The bridge's and `gitfaas publish`'s own check and sentence.
            missing = TopicParameters.of(found.name, found.variables, found.params).refusal(params.keys())
            if missing:
                print(f"gitfaas render: {missing}", file=sys.stderr)
                return 1
            if defaults := {k: v for k, v in found.defaults.items() if k not in params}:
                print("gitfaas render: defaults from config.json: "
                      + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(defaults.items())), file=sys.stderr)
        request_id = new_request_id()
        documents = render_request(settings, config, Request(
            topic=topic, request_id=request_id, identity=request_id, stream_seq=0, body=message, params=params))
    except ConfigurationError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    except (GitSyncError, PermanentError) as exc:
        print(f"gitfaas render: {exc}", file=sys.stderr)
        return 1
    out.write(yaml.safe_dump_all(documents, sort_keys=False, explicit_start=True))
    return 0
