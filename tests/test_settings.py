"""Unit tests for the shared core: `gitfaas/settings.py` and `gitfaas/subjects.py`.

(The subjects tests live here too: both modules are the small vocabulary every service shares.)
"""

from __future__ import annotations

import pytest

from gitfaas.settings import DEFAULT_BANNED_KINDS, Settings, SettingsError
from gitfaas.subjects import (
    BUILTIN_VARIABLES,
    HEADER_PARAM_ENCODING,
    HEADER_PARAM_PREFIX,
    MAX_TOPIC_LENGTH,
    InvalidName,
    check_param_name,
    check_topic,
    decode_params,
    encode_param,
)

# ---- Settings.from_env: defaults ---------------------------------------------------------------


def test_defaults_from_an_empty_environment():
    settings = Settings.from_env({"KUBE_NAMESPACE": "default"})

    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.bridge_port == 5000
    assert settings.max_payload_bytes == 65536
    assert settings.git_branch == "main"
    assert settings.git_poll_seconds == 60
    assert settings.executor == "kubernetes"
    assert settings.max_concurrency == 32
    assert settings.max_deliver == 10
    assert settings.banned_kinds == DEFAULT_BANNED_KINDS
    assert set(settings.banned_kinds) >= {"Secret", "Role", "ClusterRoleBinding", "ServiceAccount"}
    assert settings.consumer_http_port == 8080
    assert settings.request_ttl_seconds == 172800
    assert settings.config_path == "config.json"


def test_blank_values_count_as_unset():
    settings = Settings.from_env({"NATS_URL": "  ", "BRIDGE_PORT": "", "GIT_BRANCH": " ", "KUBE_NAMESPACE": "x"})

    assert settings.nats_url == "nats://127.0.0.1:4222"
    assert settings.bridge_port == 5000
    assert settings.git_branch == "main"


def test_explicit_values_are_read():
    settings = Settings.from_env({
        "NATS_URL": "nats://a:4222,nats://b:4222",
        "BRIDGE_PORT": "5050",
        "MAX_PAYLOAD_BYTES": "1024",
        "GIT_BRANCH": "prod",
        "GIT_POLL_SECONDS": "2.5",
        "EXECUTOR": "dry-run",
        "MAX_CONCURRENCY": "4",
        "MAX_DELIVER": "3",
        "BANNED_KINDS": "Secret, ConfigMap Pod",
        "CONSUMER_HTTP_PORT": "9090",
        "REQUEST_TTL_SECONDS": "60",
        "KUBE_NAMESPACE": "x",
    })

    assert settings.nats_url == "nats://a:4222,nats://b:4222"
    assert settings.bridge_port == 5050
    assert settings.max_payload_bytes == 1024
    assert settings.git_branch == "prod"
    assert settings.git_poll_seconds == 2.5
    assert settings.executor == "dry-run"
    assert settings.max_concurrency == 4
    assert settings.max_deliver == 3
    assert settings.banned_kinds == ("Secret", "ConfigMap", "Pod")
    assert settings.consumer_http_port == 9090
    assert settings.request_ttl_seconds == 60


# ---- the original gitfaas names ----------------------------------------------------------------


def test_original_gitfaas_aliases_are_honoured():
    settings = Settings.from_env({
        "GIT_PULL_BRANCH": "legacy",
        "POLLING_INTERVAL": "2",  # minutes
        "APPLY_CONFIG_PATH": "deploy/config.json",
        "BANNED_KUBE_RESS": "Secret,Pod",
        "EXPIRATION_TIME": "3600",
        "KUBE_NAMESPACE": "x",
    })

    assert settings.git_branch == "legacy"
    assert settings.git_poll_seconds == 120
    assert settings.config_path == "deploy/config.json"
    assert settings.banned_kinds == ("Secret", "Pod")
    assert settings.request_ttl_seconds == 3600


def test_new_names_win_over_the_aliases():
    settings = Settings.from_env({
        "GIT_PULL_BRANCH": "legacy",
        "GIT_BRANCH": "main2",
        "POLLING_INTERVAL": "2",
        "GIT_POLL_SECONDS": "7",
        "APPLY_CONFIG_PATH": "old.json",
        "CONFIG_PATH": "new.json",
        "BANNED_KUBE_RESS": "Pod",
        "BANNED_KINDS": "Secret",
        "EXPIRATION_TIME": "3600",
        "REQUEST_TTL_SECONDS": "10",
        "KUBE_NAMESPACE": "x",
    })

    assert settings.git_branch == "main2"
    assert settings.git_poll_seconds == 7
    assert settings.config_path == "new.json"
    assert settings.banned_kinds == ("Secret",)
    assert settings.request_ttl_seconds == 10


# ---- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BRIDGE_PORT", "abc"),
        ("BRIDGE_PORT", "-1"),
        ("MAX_PAYLOAD_BYTES", "1.5"),
        ("MAX_CONCURRENCY", "many"),
        ("MAX_DELIVER", "ten"),
        ("CONSUMER_HTTP_PORT", "http"),
        ("GIT_POLL_SECONDS", "soon"),
        ("GIT_POLL_SECONDS", "-5"),
        ("POLLING_INTERVAL", "hourly"),
        ("REQUEST_TTL_SECONDS", "forever"),
        ("EXECUTOR", "nope"),
        ("LOG_FORMAT", "xml"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name, value):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value, "KUBE_NAMESPACE": "x"})

    assert name in str(caught.value)
    assert value in str(caught.value)


def test_a_port_out_of_range_is_refused_naming_the_variable():
    with pytest.raises(SettingsError, match="BRIDGE_PORT"):
        Settings.from_env({"BRIDGE_PORT": "70000", "KUBE_NAMESPACE": "x"})


# ---- secrets -------------------------------------------------------------------------------------


def test_secrets_never_appear_in_the_repr():
    secrets = {
        "NATS_TOKEN": "nats-tok-91f2",
        "NATS_PASSWORD": "nats-pw-77ab",
        "BRIDGE_TOKEN": "bridge-tok-5c3d",
        "GIT_PERSONAL_TOKEN": "git-pat-e8e8",
    }
    settings = Settings.from_env({**secrets, "NATS_USER": "alice", "KUBE_NAMESPACE": "x"})

    # They are read...
    assert settings.nats_token == "nats-tok-91f2"
    assert settings.nats_password == "nats-pw-77ab"
    assert settings.bridge_token == "bridge-tok-5c3d"
    assert settings.git_personal_token == "git-pat-e8e8"
    # ...but never shown.
    shown = repr(settings) + str(settings)
    for secret in secrets.values():
        assert secret not in shown
    assert "alice" in shown  # the repr is not simply empty


# ---- namespaces ----------------------------------------------------------------------------------


def test_allowed_namespaces_default_to_the_kube_namespace():
    settings = Settings.from_env({"KUBE_NAMESPACE": "team-a"})

    assert settings.kube_namespace == "team-a"
    assert settings.namespaces_allowed == frozenset({"team-a"})


def test_allowed_namespaces_when_listed_replace_the_default():
    settings = Settings.from_env({"KUBE_NAMESPACE": "team-a", "ALLOWED_NAMESPACES": "team-b, team-c"})

    assert settings.namespaces_allowed == frozenset({"team-b", "team-c"})


# ---- subjects: topic names -----------------------------------------------------------------------


@pytest.mark.parametrize("topic", ["a", "a.b-c_d", "timeToCollect", "A1.b2.C3", "x" * MAX_TOPIC_LENGTH])
def test_valid_topics_are_accepted(topic):
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    ["", "a..b", ".a", "a.", "a*", "a.*", "a>", "a.>", "a b", "a\nb", "a\tb", "é", "x" * (MAX_TOPIC_LENGTH + 1)],
)
def test_invalid_topics_are_refused(topic):
    with pytest.raises(InvalidName):
        check_topic(topic)


def test_topic_refusal_says_why():
    with pytest.raises(InvalidName, match="empty"):
        check_topic("")
    with pytest.raises(InvalidName, match=str(MAX_TOPIC_LENGTH)):
        check_topic("x" * (MAX_TOPIC_LENGTH + 1))
    with pytest.raises(InvalidName, match="not valid") as refused:
        check_topic("a>x")
    assert "a>x" not in str(refused.value), "a refused value is never quoted back"


# ---- subjects: parameter names -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BUILTIN_VARIABLES))
def test_a_parameter_may_not_take_a_builtin_name(name):
    with pytest.raises(InvalidName, match="built-in"):
        check_param_name(name)


def test_builtins_include_the_documented_names():
    assert {"MESSAGE", "PAYLOAD", "RANDOM", "REQUEST_UUID", "REQUEST_ID", "FUNCTION_UID", "TOPIC",
            "NATS_URL", "BRIDGE_URL"} <= BUILTIN_VARIABLES


@pytest.mark.parametrize("name", ["body.x", "body.file.name"])
def test_a_parameter_may_not_shadow_a_body_field(name):
    with pytest.raises(InvalidName, match="body"):
        check_param_name(name)


@pytest.mark.parametrize("name", ["", "1abc", "a b", "a/b", "a{b", "-x"])
def test_malformed_parameter_names_are_refused(name):
    with pytest.raises(InvalidName):
        check_param_name(name)


@pytest.mark.parametrize("name", ["replicas", "file_name", "_x", "a.b-c", "message", "body"])
def test_ordinary_parameter_names_are_accepted(name):
    assert check_param_name(name) == name


# ---- subjects: parameter values on the wire ------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    ["plain", "two\nlines\r\nand more", "ünïcødé ✓ 漢字", "100% sure %41 %%", "a: b # c", "", " spaced "],
)
def test_encoded_parameters_round_trip_exactly(value):
    encoded = encode_param(value)
    assert "\n" not in encoded and "\r" not in encoded
    headers = {HEADER_PARAM_ENCODING: "percent", HEADER_PARAM_PREFIX + "value": encoded}

    assert decode_params(headers) == {"value": value}


def test_several_parameters_decode_with_their_names():
    headers = {
        HEADER_PARAM_ENCODING: "percent",
        HEADER_PARAM_PREFIX + "first": encode_param("1\n2"),
        HEADER_PARAM_PREFIX + "second": encode_param("50%"),
        "Gitfaas-Request-Id": "r-1",
    }

    assert decode_params(headers) == {"first": "1\n2", "second": "50%"}


def test_parameters_without_the_encoding_header_are_taken_raw():
    headers = {HEADER_PARAM_PREFIX + "ratio": "50%25", HEADER_PARAM_PREFIX + "path": "/a b/c"}

    assert decode_params(headers) == {"ratio": "50%25", "path": "/a b/c"}


def test_no_headers_means_no_parameters():
    assert decode_params(None) == {}
    assert decode_params({}) == {}
    assert decode_params({"Other": "x"}) == {}


def test_lower_case_headers_decode_like_the_canonical_ones():
    headers = {HEADER_PARAM_ENCODING.lower(): "percent", HEADER_PARAM_PREFIX.lower() + "text": encode_param("a\nb")}

    assert decode_params(headers) == {"text": "a\nb"}
