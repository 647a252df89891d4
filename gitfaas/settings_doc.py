"""What each environment variable means, for `gitfaas bridge --help` and `gitfaas consumer --help`.

Kept beside the settings (and checked against `settings.py` by a test) so that the help a person
reads lists every variable the service really reads.
"""

from __future__ import annotations

from dataclasses import dataclass

BRIDGE = "bridge"
CONSUMER = "consumer"
BOTH = (BRIDGE, CONSUMER)


@dataclass(frozen=True, slots=True)
class Variable:
    name: str
    services: tuple[str, ...]
    meaning: str


VARIABLES: tuple[Variable, ...] = (
    Variable("NATS_URL", BOTH, "NATS server(s), comma separated (default nats://127.0.0.1:4222)"),
    Variable("NATS_CREDS", BOTH, "a NATS .creds file (JWT + nkey seed)"),
    Variable("NATS_TOKEN", BOTH, "NATS token authentication"),
    Variable("NATS_USER", BOTH, "NATS user (with NATS_PASSWORD)"),
    Variable("NATS_PASSWORD", BOTH, "NATS password"),
    Variable("NATS_TLS_CA", BOTH, "CA bundle to verify NATS over TLS"),
    Variable("LOG_LEVEL", BOTH, "DEBUG, INFO (default), WARNING, ERROR"),
    Variable("LOG_FORMAT", BOTH, "json, console, or auto (default: console on a terminal)"),
    Variable("GITFAAS_STREAM", BOTH, "JetStream stream of messages (default GITFAAS)"),
    Variable("GITFAAS_DEAD_STREAM", BOTH, "stream of dead letters (default GITFAAS_DEAD)"),
    Variable("GITFAAS_SUBJECT_PREFIX", BOTH, "subject prefix (default gitfaas: gitfaas.topics.<topic>)"),
    Variable("GITFAAS_DURABLE", CONSUMER, "durable JetStream consumer name (default gitfaas-consumer)"),
    Variable("GITFAAS_REPLICAS", BOTH, "replicas of streams and buckets (3 on a NATS cluster; default 1)"),
    Variable("REQUEST_TTL_SECONDS", BOTH, "how long request status is kept (default 172800; alias EXPIRATION_TIME)"),
    Variable("BRIDGE_HOST", (BRIDGE,), "address to listen on (default 0.0.0.0)"),
    Variable("BRIDGE_PORT", (BRIDGE,), "HTTP port (default 5000)"),
    Variable("BRIDGE_TOKEN", (BRIDGE,), "when set, every route but health and metrics needs this bearer token"),
    Variable("BRIDGE_WORKERS", (BRIDGE,), "bridge processes sharing the port (SO_REUSEPORT), supervised by the "
             "first: a number or auto (the CPUs it may use, after its affinity and CPU quota, at most 8); "
             "default auto"),
    Variable("MAX_PAYLOAD_BYTES", (BRIDGE,), "largest message body (default 65536)"),
    Variable("GIT_URL", (CONSUMER,), "the pipeline repository: https, ssh, file:// or a local directory"),
    Variable("GIT_BRANCH", (CONSUMER,), "branch to follow (default main; alias GIT_PULL_BRANCH)"),
    Variable("GIT_USER_NAME", (CONSUMER,), "user for https with a token"),
    Variable("GIT_PERSONAL_TOKEN", (CONSUMER,), "token for https repositories"),
    Variable("GIT_SSH_KEY_FILE", (CONSUMER,), "private key for ssh repositories"),
    Variable("GIT_POLL_SECONDS", (CONSUMER,), "how often git is polled (default 60; alias POLLING_INTERVAL, minutes)"),
    Variable("GIT_CACHE_DIR", (CONSUMER,), "where the clone is kept (default: a temporary directory)"),
    Variable("CONFIG_PATH", (CONSUMER,), "config.json's path in the repository (alias APPLY_CONFIG_PATH)"),
    Variable("KUBE_NAMESPACE", (CONSUMER,), "namespace of documents without one (default: the pod's own)"),
    Variable("EXECUTOR", (CONSUMER,), "kubernetes (default), local or dry-run"),
    Variable("MAX_CONCURRENCY", (CONSUMER,), "messages handled at once (default 32)"),
    Variable("MAX_DELIVER", (CONSUMER,), "deliveries of a message before it goes to the dead letters (default 10)"),
    Variable("ACK_WAIT_SECONDS", (CONSUMER,), "redelivery time of an unacknowledged message (default 30)"),
    Variable("APPLY_TIMEOUT_SECONDS", (CONSUMER,), "longest wait for one API call (default 15)"),
    Variable("STALL_SECONDS", (CONSUMER,), "work waiting this long without progress counts as stalled (default 300)"),
    Variable("NATS_UNHEALTHY_SECONDS", (CONSUMER,), "/healthz fails once NATS has been unreachable this long, "
             "so the pod is restarted (default 120; 0: never)"),
    Variable("BANNED_KINDS", (CONSUMER,), "kinds never applied (default Role RoleBinding ClusterRole "
             "ClusterRoleBinding ServiceAccount Secret; alias BANNED_KUBE_RESS)"),
    Variable("ALLOWED_NAMESPACES", (CONSUMER,), "namespaces documents may target (default: KUBE_NAMESPACE only)"),
    Variable("CONSUMER_HOST", (CONSUMER,), "address of healthz/readyz/metrics (default 0.0.0.0)"),
    Variable("CONSUMER_HTTP_PORT", (CONSUMER,), "port of healthz/readyz/metrics (default 8080)"),
    Variable("BRIDGE_URL", (CONSUMER,), "the bridge as functions reach it (BRIDGE_URL variable)"),
    Variable("FUNCTION_NATS_URL", (CONSUMER,), "NATS as functions reach it (default NATS_URL)"),
    Variable("KUBECONFIG", (CONSUMER,), "cluster credentials outside a pod (default ~/.kube/config)"),
    Variable("GITFAAS_STATE_DIR", (CONSUMER,), "local executor: volumes and run records (default .gitfaas)"),
    Variable("DRY_RUN_ON_LOAD", (CONSUMER,), "true: each new commit's documents, rendered with sample values, "
             "are sent as server-side dry-run applies first; a commit the API server refuses is not loaded "
             "(default false)"),
)

# The original gitfaas's names, read when the new one is not set.
ALIASES = ("GIT_PULL_BRANCH", "POLLING_INTERVAL", "APPLY_CONFIG_PATH", "BANNED_KUBE_RESS", "EXPIRATION_TIME")


def help_text(service: str) -> str:
    rows = [variable for variable in VARIABLES if service in variable.services]
    width = max(len(variable.name) for variable in rows)
    lines = [f"  {variable.name:<{width}}  {variable.meaning}" for variable in rows]
    return "settings (environment variables):\n" + "\n".join(lines)
