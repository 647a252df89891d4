"""Unit tests for `consumer/prepare.py`: label values, stamping, generated names, policy."""

from __future__ import annotations

import copy
import re

import pytest

from consumer.prepare import (
    ANNOTATION_COMMIT,
    ANNOTATION_REQUEST_ID,
    ANNOTATION_STREAM_SEQ,
    ANNOTATION_TOPIC,
    LABEL_REQUEST_ID,
    LABEL_TOPIC,
    MANAGED_BY,
    PolicyError,
    Stamp,
    label_value,
    prepare,
)
from gitfaas.settings import Settings

# Kubernetes' own rule for a label value.
VALID_LABEL = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?)?")
SETTINGS = Settings(kube_namespace="default", allowed_namespaces=("default", "pipelines"))


def stamp_for(request_id: str = "req-1", *, topic: str = "timeToCollect", seq: int = 42) -> Stamp:
    # `identity` names the stored message (request id, stream sequence...): same on a redelivery.
    return Stamp(topic=topic, request_id=request_id, stream_seq=seq, commit="abc123", identity=f"{request_id}|{seq}")


STAMP = stamp_for()


def job(**metadata: object) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata,
        "spec": {"template": {"spec": {"containers": [{"name": "main", "image": "busybox"}]}}},
    }


def run(document: dict, *, stamp: Stamp = STAMP, ordinal: int = 0, namespace: str = "default",
        settings: Settings = SETTINGS) -> dict:
    return prepare(document, ordinal=ordinal, stamp=stamp, namespace=namespace, settings=settings)


# ---- label_value ---------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "a", "timeToCollect", "seq-12", "a.b_c-d", "x" * 63, "0123"])
def test_a_valid_label_value_is_kept(value):
    assert label_value(value) == value


@pytest.mark.parametrize(
    "value",
    ["x" * 64, "y" * 300, "a b", "-leading", "trailing-", "slash/in/it", "ünïcødé", "日本語", "a\nb", "." * 70],
)
def test_an_unusable_label_value_becomes_a_valid_one(value):
    shortened = label_value(value)

    assert shortened != value
    assert 0 < len(shortened) <= 63
    assert VALID_LABEL.fullmatch(shortened)
    assert label_value(value) == shortened  # deterministic


def test_a_shortened_label_keeps_a_readable_prefix():
    assert label_value("my request/" + "z" * 80).startswith("my-request-zzz")


def test_different_long_values_give_different_labels():
    common = "r" * 70
    values = [common + suffix for suffix in ("a", "b", "c")] + ["a b", "a/b", "a_b c", "日本", "本日"]

    labels = [label_value(value) for value in values]

    assert len(set(labels)) == len(values)


# ---- prepare: stamping ---------------------------------------------------------------------------


def test_labels_and_annotations_are_added_to_the_object_and_its_pods():
    document = run(job(name="collect", labels={"team": "data"}, annotations={"note": "kept"}))

    metadata = document["metadata"]
    assert metadata["labels"] == {
        "team": "data",
        MANAGED_BY: "gitfaas",
        LABEL_TOPIC: "timeToCollect",
        LABEL_REQUEST_ID: "req-1",
    }
    assert metadata["annotations"] == {
        "note": "kept",
        ANNOTATION_STREAM_SEQ: "42",
        ANNOTATION_COMMIT: "abc123",
        ANNOTATION_TOPIC: "timeToCollect",
        ANNOTATION_REQUEST_ID: "req-1",
    }
    pod_labels = document["spec"]["template"]["metadata"]["labels"]
    assert pod_labels[MANAGED_BY] == "gitfaas"
    assert pod_labels[LABEL_REQUEST_ID] == "req-1"


def test_gitfaas_labels_override_what_the_manifest_claims():
    document = run(job(name="x", labels={MANAGED_BY: "helm", LABEL_REQUEST_ID: "forged"}))

    assert document["metadata"]["labels"][MANAGED_BY] == "gitfaas"
    assert document["metadata"]["labels"][LABEL_REQUEST_ID] == "req-1"


def test_an_unusable_request_id_is_shortened_in_the_label_but_exact_in_the_annotation():
    request_id = "client/" + "9" * 80
    document = run(job(name="x"), stamp=stamp_for(request_id))

    label = document["metadata"]["labels"][LABEL_REQUEST_ID]
    assert label == label_value(request_id)
    assert VALID_LABEL.fullmatch(label) and len(label) <= 63
    assert document["metadata"]["annotations"][ANNOTATION_REQUEST_ID] == request_id


def test_the_topic_namespace_is_the_default():
    assert run(job(name="x"), namespace="pipelines")["metadata"]["namespace"] == "pipelines"


def test_the_document_namespace_wins_over_the_default():
    document = run(job(name="x", namespace="pipelines"), namespace="default")

    assert document["metadata"]["namespace"] == "pipelines"


# ---- prepare: generateName -----------------------------------------------------------------------


def test_generate_name_becomes_a_deterministic_name():
    first = run(job(generateName="collect-"))
    again = run(job(generateName="collect-"))  # a redelivery of the same request

    name = first["metadata"]["name"]
    assert re.fullmatch(r"collect-[a-z0-9]{5}", name)
    assert again["metadata"]["name"] == name
    assert "generateName" not in first["metadata"]


def test_generated_names_differ_across_requests_and_documents():
    names = {
        run(job(generateName="w-"))["metadata"]["name"],
        run(job(generateName="w-"), ordinal=1)["metadata"]["name"],
        run(job(generateName="w-"), stamp=stamp_for("req-2", seq=43))["metadata"]["name"],
    }

    assert len(names) == 3


def test_a_name_wins_over_generate_name():
    document = run(job(name="fixed", generateName="ignored-"))

    assert document["metadata"]["name"] == "fixed"
    assert "generateName" not in document["metadata"]


def test_a_document_without_any_name_is_refused():
    with pytest.raises(PolicyError, match="name"):
        run(job(labels={"a": "b"}))


# ---- prepare: policy -----------------------------------------------------------------------------


def test_a_banned_kind_is_refused():
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"a": "b"}}

    with pytest.raises(PolicyError, match="Secret"):
        run(secret)


def test_the_banned_kinds_come_from_the_settings():
    with pytest.raises(PolicyError, match="Job"):
        run(job(name="x"), settings=SETTINGS.replace(banned_kinds=("Job",)))


@pytest.mark.parametrize(
    ("document_namespace", "topic_namespace"),
    [("kube-system", "default"), (None, "kube-system")],
    ids=["in-document", "from-topic"],
)
def test_a_namespace_outside_the_allow_list_is_refused(document_namespace, topic_namespace):
    metadata = {"name": "x"} if document_namespace is None else {"name": "x", "namespace": document_namespace}

    with pytest.raises(PolicyError, match="kube-system"):
        run(job(**metadata), namespace=topic_namespace)


def test_only_the_kube_namespace_is_allowed_by_default():
    settings = Settings(kube_namespace="team-a")

    assert run(job(name="x"), namespace="team-a", settings=settings)["metadata"]["namespace"] == "team-a"
    with pytest.raises(PolicyError):
        run(job(name="x", namespace="default"), namespace="team-a", settings=settings)


@pytest.mark.parametrize(
    "document",
    [
        {"kind": "Job", "metadata": {"name": "x"}},
        {"apiVersion": "batch/v1", "metadata": {"name": "x"}},
        {"apiVersion": "batch/v1", "kind": "Job", "metadata": "x"},
    ],
    ids=["no-apiVersion", "no-kind", "metadata-not-mapping"],
)
def test_a_malformed_document_is_refused(document):
    with pytest.raises(PolicyError):
        run(copy.deepcopy(document))


def test_a_job_whose_spec_is_not_a_mapping_does_not_crash():
    document = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "x"}, "spec": None}

    try:
        prepared = run(document)
    except PolicyError:
        return  # refusing it is fine too
    assert prepared["metadata"]["labels"][MANAGED_BY] == "gitfaas"
