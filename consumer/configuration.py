"""Loading and checking a commit's `config.json` and the manifests it names (§3, §7).

The result is an immutable `Configuration`: the consumer swaps its reference atomically, so a
message is always rendered from one whole commit, and a bad commit never replaces a good one.
Every problem is collected (not just the first) so `gitfaas validate` can list them all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from consumer.locate import ManifestLines
from consumer.prepare import kind_refused
from consumer.render import CompiledDocument, TemplateError, compile_manifest
from gitfaas.publishing import TopicParameters
from gitfaas.schedules import schedule_problem
from gitfaas.settings import Settings
from gitfaas.subjects import InvalidName, check_param_name, check_topic

MAX_MANIFEST_BYTES = 1024 * 1024
MAX_CONFIG_BYTES = 1024 * 1024
TOPIC_KEYS = {"name", "configs", "manifests", "namespace", "maxConcurrency", "maxActiveJobs", "retries",
              "params", "schedule", "timezone", "message"}


class ConfigurationError(ValueError):
    """A commit that cannot serve; `problems` lists each one, naming file and field."""

    def __init__(self, commit: str, problems: list[str]) -> None:
        self.commit = commit
        self.problems = problems
        super().__init__(f"commit {commit[:12]}: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class Topic:
    name: str
    configs: tuple[str, ...]
    documents: tuple[CompiledDocument, ...]
    namespace: str | None = None
    max_concurrency: int | None = None
    max_active_jobs: int | None = None
    retries: int = 0
    # config.json's `params`: a string is the default of that parameter; None (`null`) declares a
    # parameter without a default, which every message must give.
    params: Mapping[str, str | None] = field(default_factory=dict)
    # `schedule`: a cron expression; the topic is published on each tick (§11), in `timezone`
    # (default UTC), with `message` as the body (a string as it is, anything else as JSON).
    schedule: str | None = None
    timezone: str | None = None
    message: Any = None

    @property
    def variables(self) -> frozenset[str]:
        return frozenset().union(*(doc.variables for doc in self.documents))

    @property
    def defaults(self) -> dict[str, str]:
        """The parameter values a message gets when it does not set them itself."""
        return {name: value for name, value in self.params.items() if value is not None}

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "configs": list(self.configs)}
        for key, value in (
            ("namespace", self.namespace),
            ("maxConcurrency", self.max_concurrency),
            ("maxActiveJobs", self.max_active_jobs),
        ):
            if value is not None:
                out[key] = value
        out["retries"] = self.retries
        out["params"] = dict(self.params)
        out["variables"] = sorted(self.variables)
        if self.schedule is not None:
            out.update(schedule=self.schedule, timezone=self.timezone or "UTC", message=self.message)
        return out


@dataclass(frozen=True, slots=True)
class Configuration:
    commit: str
    topics: Mapping[str, Topic]
    loaded_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def summary(self) -> dict[str, Any]:
        return {
            "commit": self.commit,
            "loaded_at": self.loaded_at,
            "topics": [topic.summary() for topic in self.topics.values()],
        }


def load_configuration(root: Path, commit: str, settings: Settings) -> Configuration:
    """Read and check everything; raise `ConfigurationError` listing every problem."""
    problems: list[str] = []
    config_path = settings.config_path
    raw = _read_inside(root, config_path, MAX_CONFIG_BYTES, problems, what="configuration")
    if raw is None:
        raise ConfigurationError(commit, problems)
    try:
        data = json.loads(raw)
    except RecursionError:  # `[[[[...` a few thousand deep: refuse it, do not let it escape
        raise ConfigurationError(commit, [f"{config_path}: not valid JSON: nested too deeply"]) from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise ConfigurationError(commit, [f"{config_path}: not valid JSON: {exc}"]) from None
    entries = data.get("topics") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ConfigurationError(commit, [f'{config_path}: expected an object with a "topics" list'])

    compiled: dict[str, list[CompiledDocument]] = {}
    topics: dict[str, Topic] = {}
    lines = _entry_lines(raw)
    for position, entry in enumerate(entries):
        entry_line, file_lines = lines.get(position, (None, {}))
        where = f"{config_path}:{entry_line}: topics[{position}]" if entry_line else \
            f"{config_path}: topics[{position}]"
        topic = _topic(entry, where, root, settings, compiled, problems,
                       {i: f"{config_path}:{line}: " for i, line in file_lines.items()})
        if topic is None:
            continue
        if topic.name in topics:
            problems.append(f"{where}: topic {topic.name!r} is defined twice")
            continue
        topics[topic.name] = topic
    if problems:
        raise ConfigurationError(commit, problems)
    return Configuration(commit=commit, topics=topics)


def _topic(
    entry: Any,
    where: str,
    root: Path,
    settings: Settings,
    compiled: dict[str, list[CompiledDocument]],
    problems: list[str],
    file_where: dict[int, str],
) -> Topic | None:
    if not isinstance(entry, dict):
        problems.append(f"{where}: expected an object with name and configs")
        return None
    before = len(problems)
    unknown = sorted(set(entry) - TOPIC_KEYS)
    if unknown:
        problems.append(f"{where}: unknown key(s) {', '.join(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str):
        problems.append(f"{where}.name: expected a topic name (string)")
        name = "?"
    else:
        try:
            check_topic(name, quote=True)
        except InvalidName as exc:
            problems.append(f"{where}.name: {exc}")
        where = f"{where} ({name})"
    files = entry.get("configs", entry.get("manifests"))
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        problems.append(f"{where}.configs: expected a non-empty list of manifest paths")
        files = []
    namespace = _optional(entry, "namespace", str, where, problems)
    max_concurrency = _optional(entry, "maxConcurrency", int, where, problems, minimum=1)
    max_active = _optional(entry, "maxActiveJobs", int, where, problems, minimum=1)
    retries = _optional(entry, "retries", int, where, problems, minimum=0) or 0
    params = _params(entry.get("params"), where, problems)
    schedule, timezone = entry.get("schedule"), entry.get("timezone")
    if schedule is not None:
        problem = schedule_problem(schedule, timezone)
        if problem:
            problems.append(f"{where}.schedule: {problem}")
    elif timezone is not None or "message" in entry:
        problems.append(f"{where}: timezone and message go with a schedule, which the topic does not have")
    if namespace is not None and namespace not in settings.namespaces_allowed:
        problems.append(f"{where}.namespace: {namespace!r} is not in ALLOWED_NAMESPACES "
                        f"({', '.join(sorted(settings.namespaces_allowed))})")

    documents: list[CompiledDocument] = []
    for index, path in enumerate(files):
        if path not in compiled:
            text = _read_inside(root, path, MAX_MANIFEST_BYTES, problems, what="manifest",
                                where=file_where.get(index, ""))
            if text is None:
                compiled[path] = []
                continue
            try:
                compiled[path] = compile_manifest(text.decode("utf-8"), path)
            except UnicodeDecodeError:
                problems.append(f"{path}: not UTF-8 text")
                compiled[path] = []
                continue
            except TemplateError as exc:
                problems.append(str(exc))
                compiled[path] = []
                continue
            if not compiled[path]:
                problems.append(f"{path}: holds no YAML document")
        lines: ManifestLines | None = None
        for doc in compiled[path]:
            found = check_document(doc, settings, namespace, topic=name)
            if found:  # read the file again for the lines only when there is something to report
                lines = lines or ManifestLines((root / path).read_text("utf-8", errors="replace"))
                found = check_document(doc, settings, namespace, topic=name, lines=lines)
            problems.extend(found)
        documents.extend(compiled[path])
    if schedule is not None and len(problems) == before:
        required = TopicParameters.of(str(name), frozenset().union(*(d.variables for d in documents)), params).required
        if required:
            problems.append(f"{where}.schedule: a scheduled publish gives no parameters, so each needs a default in "
                            f"\"params\": {', '.join(sorted(required))}")
    if len(problems) > before:
        return None
    return Topic(
        name=name,
        configs=tuple(files),
        documents=tuple(documents),
        namespace=namespace,
        max_concurrency=max_concurrency,
        max_active_jobs=max_active,
        retries=retries,
        params=params,
        schedule=schedule,
        timezone=timezone,
        message=entry.get("message"),
    )


def _params(value: Any, where: str, problems: list[str]) -> dict[str, str | None]:
    """`params`: parameter name -> default (a string), or null for a parameter without a default."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        problems.append(f'{where}.params: expected an object of parameter defaults, like {{"replicas": "1"}}, '
                        f"not {json.dumps(value)}")
        return {}
    params: dict[str, str | None] = {}
    for name, default in value.items():
        try:
            check_param_name(name, quote=True)
        except InvalidName as exc:
            problems.append(f"{where}.params: {exc}")
            continue
        if default is not None and not isinstance(default, str):
            problems.append(f"{where}.params.{name}: expected a string (the default value, as a message would "
                            f"send it: {json.dumps(json.dumps(default))}) or null (no default), "
                            f"not {json.dumps(default)}")
            continue
        params[name] = default
    return params


def _optional(entry: dict[str, Any], key: str, kind: type, where: str, problems: list[str],
              minimum: int | None = None) -> Any:
    value = entry.get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) or (minimum is not None and value < minimum):
        expected = "a string" if kind is str else f"a whole number >= {minimum}"
        problems.append(f"{where}.{key}: expected {expected}, not {value!r}")
        return None
    return value


def check_document(doc: CompiledDocument, settings: Settings, topic_namespace: str | None,
                   topic: str | None = None, lines: ManifestLines | None = None) -> list[str]:
    """Checks that can be made before any message: shape, kind policy, namespace.

    Values still unknown (`{{NAME}}`) are checked again on every rendered document (`prepare`).
    With the file's `lines`, a problem of one key names that key's line.
    """
    where = f"{doc.source}:{doc.line}"

    def at(*path: str) -> str:
        return f"{doc.source}:{lines.key_line(doc.index, path, doc.line)}" if lines is not None else where

    static = doc.sample()  # variables appear as "{{NAME}}" text
    problems: list[str] = []
    for key in ("apiVersion", "kind"):
        if not static.get(key):
            problems.append(f"{where}: document has no {key}")
    metadata = static.get("metadata")
    if not isinstance(metadata, dict) or not (metadata.get("name") or metadata.get("generateName")):
        problems.append(f"{where}: document has no metadata.name or metadata.generateName")
        metadata = {}
    kind = static.get("kind")
    refused = kind_refused(kind, settings) if isinstance(kind, str) else None
    if refused:
        problems.append(f"{at('kind')}: {refused}")
    allowed = ", ".join(sorted(settings.namespaces_allowed))
    namespace = metadata.get("namespace")
    if isinstance(namespace, str) and "{{" not in namespace and namespace not in settings.namespaces_allowed:
        problems.append(f"{at('metadata', 'namespace')}: namespace {namespace!r} is not allowed "
                        f"(ALLOWED_NAMESPACES: {allowed})")
    elif not namespace:
        default = topic_namespace or settings.kube_namespace
        if default not in settings.namespaces_allowed:
            problems.append(f"{where}: without metadata.namespace the document goes to {default!r} (the topic's "
                            f"namespace, else KUBE_NAMESPACE), which is not allowed (ALLOWED_NAMESPACES: {allowed})")
    if topic is not None:  # a file shared by several topics is reported once per topic that uses it
        problems = [f"{problem} (topic {topic})" for problem in problems]
    return problems


def _entry_lines(raw: bytes) -> dict[int, tuple[int, dict[int, int]]]:
    """Where each topic of config.json starts, and each of its manifest paths: {topic: (line, {file: line})}.

    JSON is read by `json` (which gives no positions); for the lines, the same text is composed as
    YAML, of which JSON is a subset, so problems can name the line to fix. Best effort: text YAML
    reads differently (or not at all) just gets no line numbers. Called only on text `json` accepted,
    which bounds its size and nesting.
    """
    try:
        root = yaml.compose(raw.decode("utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(root, yaml.MappingNode):
        return {}
    topics = next((value for key, value in root.value if getattr(key, "value", None) == "topics"), None)
    if not isinstance(topics, yaml.SequenceNode):
        return {}
    found: dict[int, tuple[int, dict[int, int]]] = {}
    for position, entry in enumerate(topics.value):
        files: dict[int, int] = {}
        if isinstance(entry, yaml.MappingNode):
            for key, value in entry.value:
                if getattr(key, "value", None) in ("configs", "manifests") and isinstance(value, yaml.SequenceNode):
                    files = {index: item.start_mark.line + 1 for index, item in enumerate(value.value)}
        found[position] = (entry.start_mark.line + 1, files)
    return found


def _read_inside(root: Path, relative: str, limit: int, problems: list[str], what: str,
                 where: str = "") -> bytes | None:
    """Read a file that must stay inside the repository (no `..`, absolute path, or escaping link).

    Links are followed only to check where they end; a file over `limit` is refused after reading at
    most `limit + 1` bytes, whatever its size claimed when it was checked. `where` prefixes each
    problem (the line of config.json that names the file).
    """
    shown = where + (repr(relative) if not relative.isprintable() else relative)
    if not relative or "\0" in relative or os.path.isabs(relative) or ".." in Path(relative).parts:
        problems.append(f"{shown if relative else where + '(empty)'}: {what} path must be relative and stay "
                        "inside the repository")
        return None
    try:
        real_root = root.resolve()
        target = (real_root / relative).resolve()
        if not target.is_relative_to(real_root):
            problems.append(f"{shown}: {what} path leaves the repository through a symbolic link")
            return None
        if not target.is_file():
            problems.append(f"{shown}: {what} file not found in the repository")
            return None
        with target.open("rb") as file:
            data = file.read(limit + 1)
    except (OSError, RuntimeError, ValueError) as exc:  # link loops, names too long, unreadable files
        reason = (exc.strerror if isinstance(exc, OSError) else None) or exc
        problems.append(f"{shown}: {what} file cannot be read: {reason}")
        return None
    if len(data) > limit:
        problems.append(f"{shown}: {what} file is larger than the limit of {limit} bytes")
        return None
    return data
