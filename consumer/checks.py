"""What the API server would refuse, found before a message uses the manifest (issue 14).

Three layers, each used by `gitfaas validate` and the last also by the consumer:

- `rule_problems`: rules no schema states — names are RFC 1123 (lower case), a Job's name fits the
  63-character `job-name` label of its pods, a Job's pods restart `Never` or `OnFailure`;
- `schema_problems`: the Kubernetes JSON schemas of a version (PyPI `kubernetes-validate`, offline,
  strict: an unknown field such as a misspelt key is reported);
- `dry_run_problems`: the cluster itself — every document, rendered with sample values, sent as a
  server-side apply with `dryRun=All` (`gitfaas validate --cluster`, and `DRY_RUN_ON_LOAD` in the
  consumer), so admission, quotas of names, immutable fields of existing Jobs, RBAC… all speak.

Documents are rendered with sample values (a parameter without a default becomes `sample`), so a
refusal caused by such a value says nothing about real messages: it is a warning, not a problem.
"""

from __future__ import annotations

import copy
import functools
import inspect
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from consumer.apierrors import fold
from consumer.configuration import Configuration, Topic
from consumer.errors import PermanentError, TransientError
from consumer.prepare import PolicyError, Stamp, prepare
from consumer.render import CompiledDocument, RenderError
from consumer.variables import MessageValues
from gitfaas.settings import Settings

SAMPLE = "sample"
SAMPLE_REQUEST = "validate"
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
JOB_NAME_MAX = 63  # its pods carry it as the label batch.kubernetes.io/job-name
# Kinds whose name must be a DNS label (63 characters, no dots) rather than a subdomain.
LABEL_NAMED = {"Namespace", "Service"}


@dataclass(frozen=True, slots=True)
class Sample:
    """One document of a topic rendered with sample values (or why it could not be)."""

    topic: Topic
    ordinal: int
    compiled: CompiledDocument
    document: dict[str, Any] | None
    error: Exception | None = None
    uses_sample: bool = False  # a parameter without a default got the value `sample`


def sample_documents(settings: Settings, config: Configuration) -> Iterator[Sample]:
    """Every document of every topic, rendered with sample values and stamped as the consumer would."""
    for topic in config.topics.values():
        values = MessageValues(request_id=SAMPLE_REQUEST, identity=SAMPLE_REQUEST, topic=topic.name, body=b"{}",
                               params=topic.defaults, nats_url=settings.nats_url, bridge_url=settings.bridge_url)
        stamp = Stamp(topic=topic.name, request_id=SAMPLE_REQUEST, stream_seq=0, commit=config.commit,
                      identity=SAMPLE_REQUEST)
        for ordinal, doc in enumerate(topic.documents):
            known = {name: values.value(name, ordinal) for name in doc.variables}
            sample = {name: value if value is not None else SAMPLE for name, value in known.items()}
            uses_sample = any(value is None for value in known.values())
            try:
                rendered = prepare(doc.render(sample), ordinal=ordinal, stamp=stamp,
                                   namespace=topic.namespace or settings.kube_namespace, settings=settings)
            except (PolicyError, RenderError) as exc:
                yield Sample(topic, ordinal, doc, None, exc, uses_sample)
                continue
            yield Sample(topic, ordinal, doc, rendered, None, uses_sample)


# ---- rules the schemas miss ---------------------------------------------------------------------


def rule_problems(document: dict[str, Any]) -> list[tuple[tuple[str, ...], str]]:
    """(key path, problem) for what the API server refuses and no JSON schema says."""
    problems: list[tuple[tuple[str, ...], str]] = []
    kind = str(document.get("kind") or "")
    metadata = document.get("metadata") if isinstance(document.get("metadata"), dict) else {}
    name = metadata.get("name")
    if isinstance(name, str):
        if kind in LABEL_NAMED:
            if len(name) > 63 or not DNS_LABEL.fullmatch(name):
                problems.append((("metadata", "name"), f"{kind} name {name!r} is not a valid RFC 1123 label: "
                                 "at most 63 characters of lower-case letters, digits and '-', starting and "
                                 "ending with a letter or digit"))
        elif len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
            problems.append((("metadata", "name"), f"{kind} name {name!r} is not a valid RFC 1123 name: lower-case "
                             "letters, digits, '-' and '.', starting and ending with a letter or digit"))
    namespace = metadata.get("namespace")
    if isinstance(namespace, str) and (len(namespace) > 63 or not DNS_LABEL.fullmatch(namespace)):
        problems.append((("metadata", "namespace"), f"namespace {namespace!r} is not a valid RFC 1123 label"))
    if kind == "Job" and str(document.get("apiVersion")) == "batch/v1":
        if isinstance(name, str) and len(name) > JOB_NAME_MAX:
            problems.append((("metadata", "name"), f"Job name {name!r} is {len(name)} characters long; a Job's "
                             f"name may have at most {JOB_NAME_MAX} (its pods carry it as a label)"))
        spec = document.get("spec") if isinstance(document.get("spec"), dict) else {}
        template = spec.get("template") if isinstance(spec.get("template"), dict) else {}
        pod = template.get("spec") if isinstance(template.get("spec"), dict) else {}
        policy = pod.get("restartPolicy")
        if policy not in ("Never", "OnFailure"):
            shown = "not set (it defaults to Always)" if policy is None else f"{policy!r}"
            problems.append((("spec", "template", "spec", "restartPolicy"),
                             f"a Job's restartPolicy must be Never or OnFailure; it is {shown}"))
    return problems


# ---- Kubernetes JSON schemas (kubernetes-validate) ----------------------------------------------


def default_kubernetes_version() -> str:
    from kubernetes_validate import latest_version

    return str(latest_version())


@functools.lru_cache(maxsize=64)
def _validator(kind: str, api_version: str, version: str) -> Any:
    """A strict validator for one kind, from kubernetes-validate's bundled schemas; None if it has none."""
    import jsonschema
    from kubernetes_validate import utils
    from referencing import Registry, Resource

    chosen = [v for v in utils.all_versions() if utils.major_minor(v) <= utils.major_minor(version)]
    if not chosen:
        raise utils.VersionNotSupportedError(version=version)
    folder = f"kubernetes-json-schema/v{chosen[-1]}-local-strict"
    mangled = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = utils.schema_contents(f"{folder}/{kind.lower()}-{mangled}.json", version)
    except FileNotFoundError:
        return None
    definitions = utils.schema_contents(f"{folder}/_definitions.json", version)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.validators.Draft202012Validator(schema, registry=registry)


def schema_problems(document: dict[str, Any], version: str | None = None
                    ) -> tuple[list[tuple[tuple[str, ...], str, Any]], str | None]:
    """([(key path, problem, offending value)], None) — or ([], why the document could not be checked)."""
    version = version or default_kubernetes_version()
    kind, api_version = str(document.get("kind") or ""), str(document.get("apiVersion") or "")
    validator = _validator(kind, api_version, version)
    if validator is None:
        return [], f"no Kubernetes {version} schema for {api_version} {kind} (a custom resource?)"
    problems = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        path = tuple(str(part) for part in error.absolute_path)
        where = ".".join(path) or "(document)"
        problems.append((path, f"{where}: {fold(error.message, 300)}", error.instance))
    return problems, None


# ---- the cluster: server-side dry-run ----------------------------------------------------------


async def dry_run_problems(settings: Settings, config: Configuration, executor: Any
                           ) -> tuple[list[str], str | None]:
    """(problems, None), or (problems so far, why checking stopped: the API server could not answer).

    Refusals caused by a sample value are left out (see the module docstring)."""
    problems, _warnings, unchecked = await dry_run_report(settings, config, executor)
    return problems, unchecked


async def dry_run_report(settings: Settings, config: Configuration, executor: Any
                         ) -> tuple[list[str], list[str], str | None]:
    """(problems, warnings, why checking stopped or None) of server-side dry-run applies."""
    problems: list[str] = []
    warnings: list[str] = []
    if "dry_run" not in inspect.signature(executor.apply).parameters:
        return problems, warnings, f"executor {settings.executor} cannot dry-run"
    for sample in sample_documents(settings, config):
        if sample.document is None:
            continue  # our own checks report it
        where = f"{sample.compiled.source}:{sample.compiled.line}: topic {sample.topic.name}"
        try:
            applied = await executor.apply(copy.deepcopy(sample.document), dry_run=True)
        except TransientError as exc:
            return problems, warnings, str(exc)
        except PermanentError as exc:
            text = f"{where}: the API server refuses it (dry-run): {exc}"
            if sample.uses_sample and SAMPLE in str(exc):
                warnings.append(f"{text} (with the sample value {SAMPLE!r} for a parameter without a default)")
            else:
                problems.append(text)
            continue
        for warning in getattr(applied, "warnings", ()) or ():
            warnings.append(f"{where}: the API server warns (dry-run): {warning}")
    return problems, warnings, None
