"""One request's documents: render every manifest of its topic and stamp the results.

Shared by the consumer (per message) and `gitfaas render` / `gitfaas validate`, so what the
command line prints is exactly what the consumer would apply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from consumer.configuration import Configuration
from consumer.errors import PermanentError
from consumer.prepare import PolicyError, Stamp, prepare
from consumer.render import MissingVariablesError, RenderError
from consumer.variables import MessageValues
from gitfaas.natsconn import display_servers
from gitfaas.settings import Settings


@dataclass(frozen=True, slots=True)
class Request:
    """What a message says, independent of how it arrived."""

    topic: str
    request_id: str
    identity: str  # see `variables.random_token`
    stream_seq: int
    body: bytes
    params: dict[str, str]


_last_nats_url: tuple[Settings, str] | None = None


def _function_nats_url(settings: Settings) -> str:
    """NATS_URL as functions get it, worked out once per (frozen) Settings instead of once per message.

    Functions get it without credentials written into it: those are gitfaas's own.
    """
    global _last_nats_url
    last = _last_nats_url
    if last is None or last[0] is not settings:
        last = _last_nats_url = (settings, settings.function_nats_url or display_servers(settings, separator=","))
    return last[1]


def render_request(settings: Settings, config: Configuration, request: Request) -> list[dict[str, Any]]:
    """Every document of the request, rendered and stamped — or `PermanentError` and nothing at all."""
    topic = config.topics.get(request.topic)
    if topic is None:
        raise PermanentError(f"topic {request.topic!r} is not in the configuration of commit {config.commit}")
    values = MessageValues(
        request_id=request.request_id,
        identity=request.identity,
        topic=request.topic,
        body=request.body,
        # A topic's `params` defaults, for what the message does not set itself.
        params={**topic.defaults, **request.params} if topic.params else request.params,
        nats_url=_function_nats_url(settings),
        bridge_url=settings.bridge_url,
    )
    stamp = Stamp(topic=request.topic, request_id=request.request_id, stream_seq=request.stream_seq,
                  commit=config.commit, identity=request.identity)
    namespace = topic.namespace or settings.kube_namespace
    resolved: list[dict[str, str]] = []
    missing: set[str] = set()
    for ordinal, doc in enumerate(topic.documents):
        try:
            resolved.append(values.resolve(doc.variables, ordinal))
        except MissingVariablesError as exc:
            missing.update(exc.names)
    if missing:
        raise PermanentError(f"missing variables: {', '.join(sorted(missing))}")
    try:
        return [
            prepare(doc.render(vals), ordinal=ordinal, stamp=stamp, namespace=namespace, settings=settings)
            for ordinal, (doc, vals) in enumerate(zip(topic.documents, resolved, strict=True))
        ]
    except (RenderError, PolicyError) as exc:
        raise PermanentError(str(exc)) from None
