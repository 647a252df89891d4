"""`gitfaas validate` and `gitfaas render`: check a pipeline repository before pushing it.

Both use the consumer's own loading and rendering code, so a repository that validates here
loads in the consumer, and `render` prints exactly what the consumer would apply.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import TextIO

import yaml

from consumer.configuration import Configuration, ConfigurationError, Topic, load_configuration
from consumer.documents import Request, render_request
from consumer.errors import PermanentError
from consumer.gitsync import GitSync, GitSyncError, content_hash
from consumer.prepare import PolicyError, Stamp, prepare
from consumer.render import RenderError
from consumer.variables import MessageValues
from gitfaas.publishing import TopicParameters
from gitfaas.settings import Settings

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
    root, commit = _snapshot(settings, repo)
    return load_configuration(root, commit, settings)


def sample_problems(settings: Settings, config: Configuration) -> list[str]:
    """§4 and §7 on rendered documents: every variable set to a sample value."""
    problems: list[str] = []
    for topic in config.topics.values():
        values = MessageValues(request_id="validate", identity="validate", topic=topic.name, body=b"{}",
                               params=topic.defaults, nats_url=settings.nats_url, bridge_url=settings.bridge_url)
        stamp = Stamp(topic=topic.name, request_id="validate", stream_seq=0, commit=config.commit,
                      identity="validate")
        for ordinal, doc in enumerate(topic.documents):
            known = {name: values.value(name, ordinal) for name in doc.variables}
            sample = {name: value if value is not None else SAMPLE for name, value in known.items()}
            try:
                prepare(doc.render(sample), ordinal=ordinal, stamp=stamp,
                        namespace=topic.namespace or settings.kube_namespace, settings=settings)
            except (RenderError, PolicyError) as exc:
                problems.append(f"{doc.source}:{doc.line}: topic {topic.name}: {exc}")
    return problems


def describe_parameters(topic: Topic) -> str | None:
    """`parameters replicas="1" (default), size (required)`: what a message on the topic may give."""
    needs = TopicParameters.of(topic.name, topic.variables, topic.params)
    names = sorted(needs.required | needs.defaults.keys())
    if not names:
        return None
    return "parameters " + ", ".join(
        f"{name}={json.dumps(needs.defaults[name])} (default)" if name in needs.defaults else f"{name} (required)"
        for name in names)


def validate(settings: Settings, repo: str, out: TextIO = sys.stdout) -> int:
    try:
        config = load(settings, repo)
    except ConfigurationError as exc:
        problems = exc.problems
    except GitSyncError as exc:
        problems = [str(exc)]
    else:
        problems = sample_problems(settings, config)
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
        request_id = str(uuid.uuid4())
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
