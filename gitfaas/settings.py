"""Settings, parsed once from the environment into a frozen object.

Every other module receives a `Settings`; none reads `os.environ` itself, so a test or the
`gitfaas up` launcher can run several services with different settings in one process.
The original gitfaas names (`GIT_PULL_BRANCH`, `POLLING_INTERVAL` in minutes, ...) are accepted
as aliases so an existing deployment keeps working.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from gitfaas.cpus import usable_cpus

DEFAULT_BANNED_KINDS = (
    "Role",
    "RoleBinding",
    "ClusterRole",
    "ClusterRoleBinding",
    "ServiceAccount",
    "Secret",
)
EXECUTORS = ("kubernetes", "local", "dry-run")
LOG_FORMATS = ("json", "console", "auto")


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


@dataclass(frozen=True)  # no slots: `cls.field` must read the default in from_env
class Settings:
    # Common
    nats_url: str = "nats://127.0.0.1:4222"
    nats_url_given: bool = False  # NATS_URL was set; if not, CLI commands look for a running `gitfaas up`
    nats_creds: str | None = None
    nats_token: str | None = dataclasses.field(default=None, repr=False)
    nats_user: str | None = None
    nats_password: str | None = dataclasses.field(default=None, repr=False)
    nats_tls_ca: str | None = None
    log_level: str = "INFO"
    log_format: str = "auto"
    stream: str = "GITFAAS"
    dead_stream: str = "GITFAAS_DEAD"
    subject_prefix: str = "gitfaas"
    durable: str = "gitfaas-consumer"
    stream_max_age_seconds: float = 7 * 24 * 3600
    duplicate_window_seconds: float = 120
    request_ttl_seconds: float = 172800
    replicas: int = 1  # JetStream replicas of the streams and buckets (3 on a 3-server NATS cluster)
    # Bridge
    bridge_host: str = "0.0.0.0"
    bridge_port: int = 5000
    bridge_token: str | None = dataclasses.field(default=None, repr=False)
    max_payload_bytes: int = 65536
    # Processes on the bridge port (issue 17). The environment's default is "auto" (the CPUs the process may
    # use, at most 8); a Settings built in code (tests, `gitfaas up`) keeps one.
    bridge_workers: int = 1
    # Consumer
    git_url: str = ""
    git_branch: str = "main"
    git_user_name: str | None = None
    git_personal_token: str | None = dataclasses.field(default=None, repr=False)
    git_ssh_key_file: str | None = None
    git_poll_seconds: float = 60
    git_cache_dir: str | None = None
    config_path: str = "config.json"
    kube_namespace: str = "default"
    executor: str = "kubernetes"
    max_concurrency: int = 32
    max_deliver: int = 10
    ack_wait_seconds: float = 30
    apply_timeout_seconds: float = 15
    stall_seconds: float = 300
    nats_unhealthy_seconds: float = 120  # consumer /healthz fails once NATS is unreachable this long (0: never)
    banned_kinds: tuple[str, ...] = DEFAULT_BANNED_KINDS
    allowed_namespaces: tuple[str, ...] = ()  # empty: only kube_namespace
    consumer_host: str = "0.0.0.0"
    consumer_http_port: int = 8080
    bridge_url: str = "http://127.0.0.1:5000"
    function_nats_url: str | None = None  # what functions are told (NATS_URL variable)
    kubeconfig: str | None = None
    state_dir: str = ".gitfaas"  # local executor: persistent volumes and run records
    dry_run_on_load: bool = False  # each commit's documents are sent as server-side dry-run applies first

    @property
    def topic_prefix(self) -> str:
        return f"{self.subject_prefix}.topics."

    # Worked out once per Settings (it is frozen): the consumer checks both for every rendered document.
    @functools.cached_property
    def namespaces_allowed(self) -> frozenset[str]:
        return frozenset(self.allowed_namespaces or (self.kube_namespace,))

    @functools.cached_property
    def banned_kinds_lowered(self) -> frozenset[str]:
        """BANNED_KINDS without case (a policy compares kinds without it)."""
        return frozenset(name.lower() for name in self.banned_kinds)

    def replace(self, **changes: object) -> Settings:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read §8 of the contract; unknown variables are ignored, bad values named."""
        env = os.environ if env is None else env
        reader = _Reader(env)
        poll = reader.number("GIT_POLL_SECONDS", None)
        if poll is None:
            minutes = reader.number("POLLING_INTERVAL", None)
            poll = minutes * 60 if minutes is not None else cls.git_poll_seconds
        executor = reader.text("EXECUTOR", cls.executor)
        if executor not in EXECUTORS:
            raise SettingsError(f"EXECUTOR must be one of {', '.join(EXECUTORS)}, not {executor!r}")
        log_format = reader.text("LOG_FORMAT", cls.log_format).lower()
        if log_format not in LOG_FORMATS:
            raise SettingsError(f"LOG_FORMAT must be json, console or auto, not {log_format!r}")
        kube_namespace = reader.text("KUBE_NAMESPACE", "") or _own_namespace() or cls.kube_namespace
        return cls(
            nats_url=reader.text("NATS_URL", cls.nats_url),
            nats_url_given=reader.optional("NATS_URL") is not None,
            nats_creds=reader.optional("NATS_CREDS"),
            nats_token=reader.optional("NATS_TOKEN"),
            nats_user=reader.optional("NATS_USER"),
            nats_password=reader.optional("NATS_PASSWORD"),
            nats_tls_ca=reader.optional("NATS_TLS_CA"),
            log_level=reader.text("LOG_LEVEL", cls.log_level).upper(),
            log_format=log_format,
            stream=reader.text("GITFAAS_STREAM", cls.stream),
            dead_stream=reader.text("GITFAAS_DEAD_STREAM", cls.dead_stream),
            subject_prefix=reader.text("GITFAAS_SUBJECT_PREFIX", cls.subject_prefix).rstrip("."),
            durable=reader.text("GITFAAS_DURABLE", cls.durable),
            replicas=reader.integer("GITFAAS_REPLICAS", cls.replicas) or 1,
            request_ttl_seconds=reader.first_number(("REQUEST_TTL_SECONDS", "EXPIRATION_TIME"),
                                                    cls.request_ttl_seconds),
            bridge_host=reader.text("BRIDGE_HOST", cls.bridge_host),
            bridge_port=reader.port("BRIDGE_PORT", cls.bridge_port),
            bridge_token=reader.optional("BRIDGE_TOKEN"),
            max_payload_bytes=reader.integer("MAX_PAYLOAD_BYTES", cls.max_payload_bytes),
            bridge_workers=_workers(reader.text("BRIDGE_WORKERS", "auto")),
            git_url=reader.text("GIT_URL", ""),
            git_branch=reader.text("GIT_BRANCH", reader.text("GIT_PULL_BRANCH", cls.git_branch)),
            git_user_name=reader.optional("GIT_USER_NAME"),
            git_personal_token=reader.optional("GIT_PERSONAL_TOKEN"),
            git_ssh_key_file=reader.optional("GIT_SSH_KEY_FILE"),
            git_poll_seconds=poll,
            git_cache_dir=reader.optional("GIT_CACHE_DIR"),
            config_path=reader.text("CONFIG_PATH", reader.text("APPLY_CONFIG_PATH", cls.config_path)),
            kube_namespace=kube_namespace,
            executor=executor,
            max_concurrency=reader.integer("MAX_CONCURRENCY", cls.max_concurrency),
            max_deliver=reader.integer("MAX_DELIVER", cls.max_deliver),
            ack_wait_seconds=reader.number("ACK_WAIT_SECONDS", cls.ack_wait_seconds),
            apply_timeout_seconds=reader.number("APPLY_TIMEOUT_SECONDS", cls.apply_timeout_seconds),
            stall_seconds=reader.number("STALL_SECONDS", cls.stall_seconds),
            nats_unhealthy_seconds=reader.number("NATS_UNHEALTHY_SECONDS", cls.nats_unhealthy_seconds),
            banned_kinds=reader.words("BANNED_KINDS", reader.words("BANNED_KUBE_RESS", DEFAULT_BANNED_KINDS)),
            allowed_namespaces=reader.words("ALLOWED_NAMESPACES", ()),
            consumer_host=reader.text("CONSUMER_HOST", cls.consumer_host),
            consumer_http_port=reader.port("CONSUMER_HTTP_PORT", cls.consumer_http_port),
            bridge_url=reader.text("BRIDGE_URL", cls.bridge_url),
            function_nats_url=reader.optional("FUNCTION_NATS_URL"),
            kubeconfig=reader.optional("KUBECONFIG"),
            state_dir=reader.text("GITFAAS_STATE_DIR", cls.state_dir),
            dry_run_on_load=reader.flag("DRY_RUN_ON_LOAD", cls.dry_run_on_load),
        )


def _own_namespace() -> str | None:
    """Inside a pod, the service account's namespace is the natural default."""
    path = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


@dataclass(frozen=True, slots=True)
class _Reader:
    env: Mapping[str, str]

    def optional(self, name: str) -> str | None:
        value = self.env.get(name, "").strip()
        return value or None

    def text(self, name: str, default: str) -> str:
        return self.optional(name) or default

    def integer(self, name: str, default: int) -> int:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a whole number, not {raw!r}") from None
        if value < 0:
            raise SettingsError(f"{name} must not be negative, not {raw!r}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self.optional(name)
        if raw is None:
            return default
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{name} must be true or false, not {raw!r}")

    def port(self, name: str, default: int) -> int:
        value = self.integer(name, default)
        if value > 65535:
            raise SettingsError(f"{name} must be a port number (0-65535), not {value}")
        return value

    def first_number(self, names: tuple[str, ...], default: float) -> float:
        """The first of `names` that is set (new name before its alias)."""
        for name in names:
            if self.optional(name) is not None:
                value = self.number(name, default)
                return default if value is None else value
        return default

    def number(self, name: str, default: float | None) -> float | None:
        raw = self.optional(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name} must be a number, not {raw!r}") from None
        if value < 0:
            raise SettingsError(f"{name} must not be negative, not {raw!r}")
        return value

    def words(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        """Space or comma separated; empty means the default, `none` means an empty list."""
        raw = self.optional(name)
        if raw is None:
            return default
        if raw.lower() == "none":
            return ()
        return tuple(word for word in raw.replace(",", " ").split() if word)


MAX_AUTO_WORKERS = 8  # past that, one bridge's NATS connection per worker costs more than it brings


def _workers(raw: str) -> int:
    """`BRIDGE_WORKERS`: a count (1 or more) or `auto` (the CPUs this process may use, at most 8)."""
    if raw.strip().lower() == "auto":
        return min(MAX_AUTO_WORKERS, usable_cpus())
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise SettingsError(f"BRIDGE_WORKERS must be a number of processes (1 or more) or auto, not {raw!r}")
    return value
