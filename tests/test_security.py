"""Issue 6: hostile input never reaches the cluster — injection, path escape, policy, limits, authentication.

Each test names the defence it proves; with that defence removed, the test fails. The template battery
of tests/test_render.py (every hostile value in every placement, in-process) is not repeated here: these
tests add the same promise end to end, the repository and size limits, policy on rendered values, the
bridge's edge, NATS credentials and secret handling.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import git
import pytest
import structlog
import yarl
from aiohttp import web

import bridge.app
from consumer.gitsync import GitSync
from consumer.prepare import PolicyError, Stamp, prepare
from consumer.render import (
    MAX_ALIASES_PER_FILE,
    MAX_DEPTH,
    MAX_DOCUMENTS_PER_FILE,
    MAX_NODES_PER_DOCUMENT,
    compile_manifest,
)
from gitfaas import natsconn
from gitfaas.embedded import EmbeddedNats, free_port
from gitfaas.settings import Settings
from gitfaas.subjects import HEADER_ERROR
from tests.conftest import GitRepo, config_json, job_manifest, make_settings, running_stack, wait_for
from tests.emulator import EmulatorHandle
from tests.test_configuration import has_problem, problems_of
from tests.test_core_loop import dead_letters
from tests.test_render_properties import key_paths

SETTINGS = Settings(kube_namespace="default", allowed_namespaces=("default", "pipelines"))


def all_objects(k8s: EmulatorHandle) -> list[dict[str, Any]]:
    """Everything the emulated API server holds, whatever its kind."""
    return [obj.raw for obj in k8s.emulator.objects.values() if not obj.deleted]




def write_repo(root: Path, files: dict[str, str | bytes]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    return root


CONFIG_MAP = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{{RANDOM}}\ndata:\n  a: b\n"


# ==== 1. Template safety, end to end (§4) ============================================================

HOSTILE_JOB = """\
apiVersion: batch/v1
kind: Job
metadata:
  name: hostile-{{RANDOM}}
  annotations:
    plain: {{v}}
    {{v}}: key-position
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: busybox:1.36
          args: ["{{v}}", '{{v}}', {{v}}, last]
          env:
            - name: DOUBLE
              value: "{{v}}"
            - name: SINGLE
              value: '{{ v }}'
            - name: LITERAL
              value: |-
                {{v}}
            - name: FOLDED
              value: >-
                {{v}}
            - name: AFTER
              value: unchanged
"""

# What reaches the bridge as a query parameter (the request line caps one value at a few KiB; the
# 1 MB values are in tests/test_render.py and tests/test_render_properties.py).
HOSTILE_PARAMS = [
    "a\nkind: Secret",
    "x: y",
    "# comment",
    "a #c",
    "- item",
    "{a: 1}",
    "[1, 2]",
    "---\napiVersion: v1\nkind: Secret\nmetadata: {name: stolen}\n",
    "...",
    "&anchor",
    "*alias",
    "!!python/object/apply:os.system ['id']",
    "'\"\\\"'",
    "\\",
    "a\rb",
    "\r\n",
    "\u2028",
    "\u2029",
    "\u0085",
    "\x00",
    "}]\n- {{v}}\n",
    ("---\nkind: Secret\n- x\n# c: 'y\" {[&a *a !b |>\u2028\x00\r\n" * 40)[:2000],
]


async def test_hostile_query_parameters_change_only_their_scalars_end_to_end(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    """Defence: rendering on the node tree. Through HTTP, NATS and the consumer, a parameter placed
    quoted, plain, in a block scalar or as a key yields a Job with exactly the template's key paths."""
    repo = GitRepo(tmp_path / "repo")
    repo.commit({"config.json": config_json({"hostile": ["job.yaml"]}), "job.yaml": HOSTILE_JOB})
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        ids: dict[str, str] = {}
        for value in ["benign", *HOSTILE_PARAMS]:
            response = await stack.publish("hostile", "x", params={"v": value})
            assert response.status == 202, await response.text()
            ids[(await response.json())["request_id"]] = value
        jobs = await wait_for(lambda: len(k8s.jobs()) == len(ids) and k8s.jobs(), message="one Job per message")
        assert not [obj for obj in all_objects(k8s) if obj["kind"] != "Job"], "no other kind was created"

        by_value = {ids[job["metadata"]["annotations"]["gitfaas.io/request-id"]]: job for job in jobs}
        benign_paths = key_paths(by_value["benign"])
        for value in HOSTILE_PARAMS:
            job = by_value[value]
            # The one key written `{{v}}:` is named by the value; every other path is the template's.
            expected = {tuple(value if part == "benign" else part for part in path) for path in benign_paths}
            assert key_paths(job) == expected, f"structure changed for {value[:40]!r}"
            assert job["kind"] == "Job" and job["metadata"]["namespace"] == "default"
            container = job["spec"]["template"]["spec"]["containers"][0]
            env = {item["name"]: item["value"] for item in container["env"]}
            assert env == {"DOUBLE": value, "SINGLE": value, "LITERAL": value, "FOLDED": value,
                           "AFTER": "unchanged"}, "quoted and block placements round-trip exactly"
            assert container["args"] == [value, value, value, "last"]
            annotations = job["metadata"]["annotations"]
            assert annotations["plain"] == value and annotations[value] == "key-position"


# ==== 2. Repository safety (§3): paths, symbolic links, sizes ========================================


def git_snapshot(tmp_path: Path, files: dict[str, str], links: dict[str, str]) -> Path:
    """Commit `files` and symbolic links (name -> target, as committed) to a git repository, then
    check it out through GitSync the way the consumer does: the links arrive as links."""
    repo = GitRepo(tmp_path / "origin")
    for name, target in links.items():
        (repo.path / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target, repo.path / name)
    repo.commit(files)
    snapshot = GitSync(Settings(git_url=repo.path.as_uri(), git_cache_dir=str(tmp_path / "cache"))).sync()
    for name in links:
        assert (snapshot.root / name).is_symlink()
    return snapshot.root


def test_committed_symlinks_leaving_the_repository_are_refused_at_load(tmp_path: Path) -> None:
    """Defence: every listed file is resolved and must stay inside the checkout (§3)."""
    outside = write_repo(tmp_path / "outside", {"job.yaml": job_manifest("escaped"), "config.json": "{}"})
    root = git_snapshot(tmp_path, {
        "config.json": config_json({"absolute": ["abs.yaml"], "relative": ["rel.yaml"],
                                    "via-dir": ["jobs/job.yaml"], "loop": ["loop-a.yaml"],
                                    "fine": ["inside.yaml"]}),
        "real.yaml": job_manifest("real"),
    }, links={
        "abs.yaml": str(outside / "job.yaml"),
        "rel.yaml": "../outside/job.yaml",
        "jobs": str(outside),  # a linked directory
        "loop-a.yaml": "loop-b.yaml",
        "loop-b.yaml": "loop-a.yaml",
        "inside.yaml": "real.yaml",
    })

    problems = problems_of(root)

    for name in ("abs.yaml", "rel.yaml", "jobs/job.yaml"):
        assert has_problem(problems, name, "leaves the repository"), (name, problems)
    assert has_problem(problems, "loop-a.yaml"), problems  # a link loop is a problem, not a crash
    assert not any("inside.yaml" in problem for problem in problems), "a link inside the repository is fine"
    assert not any("escaped" in problem for problem in problems)


def test_a_committed_config_json_linking_outside_is_refused(tmp_path: Path) -> None:
    outside = write_repo(tmp_path / "elsewhere", {"config.json": config_json({"t": ["a.yaml"]})})
    root = git_snapshot(tmp_path, {"a.yaml": job_manifest("a")}, links={"config.json": str(outside / "config.json")})

    assert has_problem(problems_of(root), "config.json", "leaves the repository")


@pytest.mark.parametrize(
    "path",
    ["../outside.yaml", "/etc/passwd", "jobs/../../outside.yaml", "", "a\x00.yaml", "x" * 5000 + ".yaml"],
    ids=["dotdot", "absolute", "nested-dotdot", "empty", "nul", "too-long"],
)
def test_hostile_manifest_paths_are_problems_not_crashes(tmp_path: Path, path: str) -> None:
    (tmp_path / "outside.yaml").write_text(job_manifest("read-from-outside"))
    root = write_repo(tmp_path / "repo", {"config.json": json.dumps({"topics": [{"name": "t", "configs": [path]}]})})

    problems = problems_of(root)

    assert len(problems) == 1
    assert any(reason in problems[0] for reason in ("must be relative", "cannot be read")), problems
    assert "read-from-outside" not in problems[0]


def test_oversized_files_are_refused_without_reading_them_whole(tmp_path: Path) -> None:
    """Defence: 1 MiB limits on config.json and on each manifest, enforced by reading at most limit + 1."""
    root = write_repo(tmp_path / "repo", {
        "config.json": config_json({"big": ["big.yaml"], "huge": ["huge.yaml"], "ok": ["ok.yaml"]}),
        "big.yaml": job_manifest("big") + "# " + "x" * (1024 * 1024) + "\n",
        "ok.yaml": job_manifest("ok") + "# " + "x" * (1024 * 1024 - 1000) + "\n",
    })
    with (root / "huge.yaml").open("wb") as sparse:  # 20 GiB that take no disk and must take no time
        sparse.truncate(20 * 1024**3)

    started = time.perf_counter()
    problems = problems_of(root)

    assert time.perf_counter() - started < 2
    assert has_problem(problems, "big.yaml", "larger than the limit of 1048576 bytes")
    assert has_problem(problems, "huge.yaml", "larger than the limit")
    assert not any("ok.yaml" in problem for problem in problems)

    (root / "config.json").write_text(json.dumps({"topics": [], "pad": "x" * (1024 * 1024)}))
    assert has_problem(problems_of(root), "config.json", "larger than the limit of 1048576 bytes")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[" * 200_000 + "]" * 200_000, "nested too deeply"),
        ('{"topics": [], "n": ' + "9" * 10_000 + "}", "not valid JSON"),
        ("\xff\xfe{", "not valid JSON"),
    ],
    ids=["deep-nesting", "giant-integer", "not-utf8"],
)
def test_a_hostile_config_json_is_a_problem_not_a_crash(tmp_path: Path, text: str, expected: str) -> None:
    root = write_repo(tmp_path / "repo", {"config.json": text.encode("latin-1")})

    assert has_problem(problems_of(root), "config.json", expected)


# ---- YAML bombs ----------------------------------------------------------------------------------

HEADER = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bomb\n"


def billion_laughs(levels: int = 9) -> str:
    text = HEADER + 'data:\n  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for level in range(1, levels + 1):
        text += f"  a{level}: &a{level} [" + ",".join([f"*a{level - 1}"] * 9) + "]\n"
    return text


def merge_bomb(levels: int = 12) -> str:
    text = HEADER + "data:\n  m0: &m0 {a: 1, b: 2}\n"
    for level in range(1, levels + 1):
        text += f"  m{level}: &m{level} {{<<: [" + ", ".join([f"*m{level - 1}"] * 8) + "]}\n"
    return text


# Deep nesting may be refused by our own limit or by the YAML library's (PyYAML 6.0.4 has one that fires
# first, with its own words): what matters is that the file is refused fast, named with a line. So the
# depth bombs expect no particular wording (None).
BOMBS: dict[str, tuple[str, str | None]] = {
    "deep-flow": (HEADER + "data: " + "[" * 10_000 + "]" * 10_000 + "\n", None),
    "deep-flow-unclosed": (HEADER + "data: " + "[" * 10_000 + "\n", None),
    "deep-mapping": (HEADER + "data: " + "{a: " * 10_000 + "1" + "}" * 10_000 + "\n", None),
    "deep-block": (HEADER + "".join(" " * i + f"k{i}:\n" for i in range(1_000)), None),
    "billion-laughs": (billion_laughs(), f"more than {MAX_NODES_PER_DOCUMENT} nodes"),
    "merge-keys": (merge_bomb(), f"more than {MAX_NODES_PER_DOCUMENT} nodes"),
    "wide-list": (HEADER + "data: [" + "1," * 60_000 + "1]\n", f"more than {MAX_NODES_PER_DOCUMENT} nodes"),
    "many-aliases": (HEADER + "data:\n  x: &x 1\n  l: [" + ",".join(["*x"] * (MAX_ALIASES_PER_FILE + 1)) + "]\n",
                     f"more than {MAX_ALIASES_PER_FILE} aliases"),
    "many-documents": ("---\n".join([HEADER] * (MAX_DOCUMENTS_PER_FILE + 1)),
                       f"more than {MAX_DOCUMENTS_PER_FILE} YAML documents"),
    "many-small-documents": ((HEADER + "data: [" + "1," * 40_000 + "1]\n---\n") * 6, "file has more than"),
}


@pytest.mark.parametrize("bomb", BOMBS, ids=str)
def test_yaml_bombs_are_refused_fast_naming_the_file(tmp_path: Path, bomb: str) -> None:
    """Defence: depth, node (aliases expanded), alias and document limits, checked on the event stream."""
    text, expected = BOMBS[bomb]
    root = write_repo(tmp_path / "repo", {"config.json": config_json({"t": [f"{bomb}.yaml"]}), f"{bomb}.yaml": text})

    started = time.perf_counter()
    problems = problems_of(root)
    elapsed = time.perf_counter() - started

    assert elapsed < 2, f"took {elapsed:.1f}s"
    named = [problem for problem in problems if re.match(rf"{bomb}\.yaml:\d+: ", problem)]
    assert named, problems
    if expected is not None:
        assert has_problem(named, expected), problems


def test_deep_nesting_that_crashed_the_c_parser_is_refused_in_a_child_process() -> None:
    """Half a million `[` used to overflow the C stack of libyaml's composer: a segfault, not an error.
    Run where a crash cannot take the test run down, and expect a clear TemplateError instead."""
    code = ("from consumer.render import compile_manifest, TemplateError\n"
            "try:\n    compile_manifest('a: ' + '[' * 500000 + ']' * 500000, 'deep.yaml')\n"
            "except TemplateError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                            cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-500:]}"
    assert result.stdout.startswith("deep.yaml:1: "), result.stdout[:300]


def test_the_limits_leave_real_manifests_alone() -> None:
    deep = HEADER + "data: " + "[" * (MAX_DEPTH - 5) + "]" * (MAX_DEPTH - 5) + "\n"
    wide = HEADER + "data:\n" + "".join(f"  key{i}: value {i}\n" for i in range(10_000))
    anchors = HEADER + "spec:\n  base: &b {image: busybox, env: [{name: A, value: '1'}]}\n" + "".join(
        f"  c{i}: *b\n" for i in range(200))
    multi = "---\n".join([HEADER] * 500)
    for text in (deep, wide, anchors, multi):
        assert compile_manifest(text, "fine.yaml")


async def test_a_bomb_commit_is_refused_and_the_last_good_one_keeps_serving(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    repo = GitRepo(tmp_path / "repo")
    good = repo.commit({"config.json": config_json({"hello": ["hello.yaml"]}), "hello.yaml": job_manifest("hello")})
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        bomb = repo.commit({"config.json": config_json({"hello": ["hello.yaml"], "lol": ["lol.yaml"]}),
                            "lol.yaml": billion_laughs(), "deep.yaml": "a: " + "[" * 300_000})
        started = time.perf_counter()
        status, state = await stack.get_json("/refresh")
        assert time.perf_counter() - started < 3
        assert status == 200 and state["commit"] == good
        assert bomb[:12] in state["error"] and "lol.yaml" in state["error"] and "nodes" in state["error"]
        assert (await stack.publish("hello", "still serving")).status == 202
        await wait_for(lambda: len(k8s.jobs()) == 1, message="the good topic's Job")


# ==== 3. Policy (§7): at load, per topic, and on rendered values ====================================


def test_policy_at_load_names_each_topic_that_uses_a_bad_file(tmp_path: Path) -> None:
    root = write_repo(tmp_path / "repo", {
        "config.json": config_json({"one": ["secret.yaml"], "two": ["ok.yaml", "secret.yaml"],
                                    "lower": ["lower.yaml"], "list": ["list.yaml"], "slist": ["slist.yaml"]}),
        "ok.yaml": job_manifest("ok"),
        "secret.yaml": "apiVersion: v1\nkind: Secret\nmetadata:\n  name: s\n",
        "lower.yaml": "apiVersion: rbac.authorization.k8s.io/v1\nkind: clusterrolebinding\nmetadata:\n  name: x\n",
        "list.yaml": "apiVersion: v1\nkind: List\nmetadata:\n  name: l\nitems:\n  - {apiVersion: v1, kind: Secret}\n",
        "slist.yaml": "apiVersion: v1\nkind: SecretList\nmetadata:\n  name: l\nitems: []\n",
    })

    problems = problems_of(root)

    assert has_problem(problems, "secret.yaml:2", "kind Secret is banned", "(topic one)")
    assert has_problem(problems, "secret.yaml:2", "kind Secret is banned", "(topic two)")
    assert has_problem(problems, "lower.yaml:2", "clusterrolebinding", "banned")
    assert has_problem(problems, "list.yaml:2", "kind List is refused")
    assert has_problem(problems, "slist.yaml:2", "kind SecretList is refused")


def test_the_namespace_default_must_be_allowed_too(tmp_path: Path) -> None:
    """A document without a namespace goes to the topic's namespace, else KUBE_NAMESPACE: that one
    must be in ALLOWED_NAMESPACES as well, checked at load, not first discovered per message."""
    root = write_repo(tmp_path / "repo", {
        "config.json": json.dumps({"topics": [
            {"name": "implicit", "configs": ["a.yaml"]},
            {"name": "explicit", "configs": ["a.yaml"], "namespace": "pipelines"},
            {"name": "outside", "configs": ["a.yaml"], "namespace": "kube-system"},
        ]}),
        "a.yaml": job_manifest("a"),
    })
    settings = Settings(kube_namespace="gitfaas", allowed_namespaces=("pipelines",))

    problems = problems_of(root, settings)

    assert has_problem(problems, "a.yaml:1", "'gitfaas'", "ALLOWED_NAMESPACES", "(topic implicit)")
    assert not any("(topic explicit)" in problem for problem in problems)
    assert has_problem(problems, "outside", "kube-system", "ALLOWED_NAMESPACES")


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"apiVersion": "v1", "kind": "secret", "metadata": {"name": "x"}}, "banned"),
        ({"apiVersion": "v1", "kind": "SECRET", "metadata": {"name": "x"}}, "banned"),
        ({"apiVersion": "v1", "kind": "SecretList", "metadata": {"name": "x"}}, "refused"),
        ({"apiVersion": "v1", "kind": "List", "metadata": {"name": "x"}}, "refused"),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "Default"}}, "namespace"),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": 1}}, "namespace"),
        ({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": ["default"]}}, "namespace"),
    ],
    ids=["lowercase", "uppercase", "kind-list", "list", "namespace-case", "namespace-int", "namespace-list"],
)
def test_rendered_documents_are_checked_again(document: dict[str, Any], reason: str) -> None:
    stamp = Stamp(topic="t", request_id="r", stream_seq=1, commit="c", identity="r|1")
    with pytest.raises(PolicyError, match=reason):
        prepare(document, ordinal=0, stamp=stamp, namespace="default", settings=SETTINGS)


POLICY_REPO = {
    "config.json": config_json({"multi": ["multi.yaml"], "kinded": ["kinded.yaml"]}),
    # The first document is harmless: it must not be applied when a later one is refused.
    "multi.yaml": CONFIG_MAP + "---\n" + job_manifest("multi").replace(
        "metadata:\n", "metadata:\n  namespace: '{{ns}}'\n", 1),
    "kinded.yaml": "apiVersion: v1\nkind: '{{k}}'\nmetadata:\n  name: k-{{RANDOM}}\ndata:\n  a: b\n",
}


async def test_parameters_cannot_escape_policy_and_nothing_of_the_message_is_applied(
    nats_server: EmbeddedNats, k8s: EmulatorHandle, tmp_path: Path
) -> None:
    """Defence: `prepare` re-checks kind and namespace on every rendered document, before any apply."""
    repo = GitRepo(tmp_path / "repo")
    repo.commit(POLICY_REPO)
    async with running_stack(make_settings(nats_server, k8s, repo.path, tmp_path)) as stack:
        hostile = [
            ("multi", {"ns": "kube-system"}, "namespace 'kube-system' is not allowed"),
            ("multi", {"ns": "default\nkind: Secret"}, "is not allowed"),
            ("kinded", {"k": "Secret"}, "kind Secret is banned"),
            ("kinded", {"k": "ClusterRoleBinding"}, "kind ClusterRoleBinding is banned"),
            ("kinded", {"k": "secretList"}, "kind secretList is refused"),
        ]
        for topic, params, reason in hostile:
            response = await stack.publish(topic, "x", params={**params, "wait": "completed", "timeout": "5"})
            assert response.status == 422, await response.text()  # it ended dead
            document = await response.json()
            assert document["state"] == "dead" and reason in document["error"], document

        letters = await dead_letters(stack.settings.nats_url, len(hostile))
        assert [letter.subject for letter in letters] == [f"gitfaas.dead.{topic}" for topic, _, _ in hostile]
        for (_, _, reason), letter in zip(hostile, letters, strict=True):
            assert reason in letter.headers[HEADER_ERROR]
        assert all_objects(k8s) == [], "not even the harmless first document was applied"

        # The services keep serving: the next good messages are applied.
        assert (await stack.publish("multi", "ok", params={"ns": "default"})).status == 202
        assert (await stack.publish("kinded", "ok", params={"k": "ConfigMap"})).status == 202
        await wait_for(lambda: len(k8s.jobs()) == 1 and len(k8s.objects("v1", "configmaps")) == 2,
                       message="the good messages' objects")
        assert sorted(obj["kind"] for obj in all_objects(k8s)) == ["ConfigMap", "ConfigMap", "Job"]


# ==== 4. The bridge's edge (§5) ======================================================================

TOKEN = "brdg-t0ken-9f3a+/="


@pytest.fixture
async def guarded(nats_server: EmbeddedNats, repo: GitRepo, tmp_path: Path) -> AsyncIterator[Any]:
    """The stack with BRIDGE_TOKEN set (dry-run executor: these tests are about the edge)."""
    async with running_stack(make_settings(nats_server, None, repo.path, tmp_path, bridge_token=TOKEN)) as stack:
        yield stack


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/publish/hello"), ("GET", "/topics"), ("GET", "/refresh"), ("POST", "/refresh"),
     ("GET", "/requests/x"), ("POST", "/requests/x/replay"), ("POST", "/response/x"), ("GET", "/response/x"),
     ("GET", "/nowhere"), ("GET", "/healthz/../topics"), ("GET", "//topics"), ("GET", "/%74opics"),
     ("GET", "/metrics/"), ("POST", "/publish/bad*name")],
)
async def test_without_the_token_everything_but_health_is_401(guarded: Any, method: str, path: str) -> None:
    url = guarded.bridge_url + path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}):
        async with guarded.http.request(method, yarl_url(url), headers=headers) as response:
            assert response.status == 401, (headers, await response.text())
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
            assert "bearer token" in (await response.json())["error"]


def yarl_url(url: str) -> yarl.URL:
    return yarl.URL(url, encoded=True)  # send the path exactly as written


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_health_readiness_and_metrics_stay_open(guarded: Any, path: str) -> None:
    async with guarded.http.get(guarded.bridge_url + path) as response:
        assert response.status == 200


async def test_the_right_token_works_and_is_compared_in_constant_time(
    guarded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = bridge.app.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(bridge.app.hmac, "compare_digest", spy)
    response = await guarded.publish("hello", "x", headers=AUTH)
    assert response.status == 202
    response = await guarded.publish("hello", "x", headers={"Authorization": f"bearer  {TOKEN} "})
    assert response.status == 202, "scheme is case-insensitive, surrounding spaces ignored"
    async with guarded.http.get(guarded.bridge_url + "/topics", headers=AUTH) as topics:
        assert topics.status == 200
    assert len(compared) == 3, "every check went through hmac.compare_digest"


@pytest.mark.parametrize(
    ("topic", "params", "headers", "body", "status", "fragment"),
    [
        ("bad*name", {}, {}, b"x", 400, "topic name"),
        ("a..b", {}, {}, b"x", 400, "topic name"),
        (".a", {}, {}, b"x", 400, "topic name"),
        ("a.", {}, {}, b"x", 400, "topic name"),
        (">", {}, {}, b"x", 400, "topic name"),
        ("a%20b", {}, {}, b"x", 400, "topic name"),
        ("t" * 201, {}, {}, b"x", 400, "longer than"),
        ("%C3%A4", {}, {}, b"x", 400, "topic name"),
        ("hello", {"RANDOM": "mine"}, {}, b"x", 400, "RANDOM"),
        ("hello", {"body.x": "1"}, {}, b"x", 400, "body"),
        ("hello", {"a b": "1"}, {}, b"x", 400, "not valid"),
        ("hello", {}, {"Content-Type": "application/json"}, b"{nope", 400, "JSON"),
        ("nope", {}, {}, b"x", 404, "not in the configuration"),
        ("hello", {}, {}, b"x" * 65537, 413, "MAX_PAYLOAD_BYTES"),
        ("hello", {}, {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--", 415, "cannot be a message body"),
        ("hello", {}, {"Content-Type": "Multipart/Mixed; boundary=x"}, b"--x--", 415, "cannot be a message body"),
        # Any single type is one body, taken as bytes (the original gitfaas read the raw body).
        ("hello", {}, {"Content-Type": "image/png"}, b"\x89PNG", 202, None),
        ("hello", {}, {"Content-Type": "application/xml"}, b"<a/>", 202, None),
        ("hello", {}, {"Content-Type": "plain/text"}, b"x", 202, None),
        ("hello", {}, {"Content-Type": "text/plain; charset=utf-8"}, b"x", 202, None),
        ("hello", {}, {"Content-Type": "application/octet-stream"}, b"\x00\xff", 202, None),
        ("hello", {}, {"Content-Type": "application/json"}, b'{"a": 1}', 202, None),
        ("hello", {}, {}, b"x" * 65536, 202, None),
    ],
)
async def test_publish_answers_per_the_contract(
    guarded: Any, topic: str, params: dict[str, str], headers: dict[str, str], body: bytes, status: int,
    fragment: str | None,
) -> None:
    url = yarl_url(f"{guarded.bridge_url}/publish/{topic}")
    async with guarded.http.post(url, data=body, params=params, headers={**AUTH, **headers}) as response:
        assert response.status == status, await response.text()
        answer = await response.json()
        if fragment is not None:
            assert set(answer) == {"error"} and fragment in answer["error"]


async def test_a_declared_oversized_body_is_refused_before_any_of_it_is_read(guarded: Any) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", guarded.settings.bridge_port)
    try:
        writer.write(f"POST /publish/hello HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Type: text/plain\r\nContent-Length: {10 * 1024 * 1024}\r\n\r\n".encode())
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)  # not one body byte was sent
        assert status_line.startswith(b"HTTP/1.1 413"), status_line
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def probed_bridge(stack: Any) -> AsyncIterator[tuple[str, list[int]]]:
    """A second listener for the same bridge whose outermost middleware records, per request, how many
    body bytes the server had taken off the socket when the answer was decided."""
    read: list[int] = []

    @web.middleware
    async def probe(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        finally:
            read.append(request.content.total_bytes)

    app = stack.bridge.app()
    app.middlewares.insert(0, probe)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", read
    finally:
        await runner.cleanup()


async def test_a_chunked_oversized_body_is_refused_while_reading(guarded: Any) -> None:
    """Defence: the body is read with a running count (aiohttp's own, up to client_max_size): a 10 MB
    chunked upload, which has no Content-Length to check, is refused with 413 once the limit is passed,
    not after buffering it."""
    limit = guarded.settings.max_payload_bytes
    sent = 0

    async def ten_megabytes() -> AsyncIterator[bytes]:
        nonlocal sent
        chunk = b"z" * 16384
        for _ in range(640):
            sent += len(chunk)
            yield chunk

    async with probed_bridge(guarded) as (url, read):
        started = time.perf_counter()
        async with guarded.http.post(f"{url}/publish/hello", data=ten_megabytes(), headers=AUTH) as response:
            assert response.status == 413
            assert "MAX_PAYLOAD_BYTES" in (await response.json())["error"]
        assert time.perf_counter() - started < 5
        # The limit, plus what aiohttp takes off the socket before it pauses reading (its stream buffer and
        # one 256 KiB socket read): a constant, whatever the client sends. Unbounded, this would be 10 MB.
        assert read and read[0] <= limit + 512 * 1024, f"the server had read {read[0]} bytes"
        assert sent > read[0], "the client did send more than the server took"
        # A body just under the limit, chunked, still goes through.
        async with guarded.http.post(f"{url}/publish/hello", data=small_chunks(limit), headers=AUTH) as response:
            assert response.status == 202


async def small_chunks(total: int) -> AsyncIterator[bytes]:
    for start in range(0, total, 1000):
        yield b"y" * min(1000, total - start)


# ==== 5. NATS credentials, in both services (§8) =====================================================


@contextlib.asynccontextmanager
async def nats_with(tmp_path: Path, *args: str) -> AsyncIterator[EmbeddedNats]:
    server = EmbeddedNats(tmp_path / "nats-auth", extra_args=args)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def refused(settings: Settings) -> natsconn.NatsConfigError:
    """Connecting fails at once with a clear error (not a retry loop), as the services start it."""
    with pytest.raises(natsconn.NatsConfigError) as caught:
        await asyncio.wait_for(natsconn.connect(settings, "gitfaas-test"), 5)
    return caught.value


NATS_TOKEN = "nats-t0ken-71c2"
NATS_PASSWORD = "nats-pa55-word-8d1e"


async def test_token_auth_works_for_both_services_and_a_wrong_token_is_refused(
    k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    async with nats_with(tmp_path, "--auth", NATS_TOKEN) as server:
        base = make_settings(server, k8s, repo.path, tmp_path)
        for wrong in (base, base.replace(nats_token="not-it")):
            error = await refused(wrong)
            assert "refused the credentials" in str(error) and "not-it" not in str(error)
        async with running_stack(base.replace(nats_token=NATS_TOKEN)) as stack:
            assert (await stack.publish("hello", "via token")).status == 202
            await wait_for(lambda: k8s.jobs(), message="a Job through a token-protected NATS")


async def test_user_password_auth_works_for_both_services_and_a_wrong_one_is_refused(
    k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path
) -> None:
    async with nats_with(tmp_path, "--user", "gitfaas", "--pass", NATS_PASSWORD) as server:
        base = make_settings(server, k8s, repo.path, tmp_path)
        error = await refused(base.replace(nats_user="gitfaas", nats_password="wrong-pw-4242"))
        assert "NATS_USER/NATS_PASSWORD" in str(error) and "wrong-pw-4242" not in str(error)
        await refused(base)
        async with running_stack(base.replace(nats_user="gitfaas", nats_password=NATS_PASSWORD)) as stack:
            assert (await stack.publish("hello", "via password")).status == 202
            await wait_for(lambda: k8s.jobs(), message="a Job through a password-protected NATS")


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=30)
    return cert, key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
async def test_tls_with_a_private_ca(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path)
    async with nats_with(tmp_path, "--tls", "--tlscert", str(cert), "--tlskey", str(key)) as server:
        settings = Settings(nats_url=server.url)
        error = await refused(settings)
        assert "not trusted" in str(error) and "NATS_TLS_CA" in str(error)
        nc = await natsconn.connect(settings.replace(nats_tls_ca=str(cert)), "gitfaas-test", attempts=1)
        try:
            assert nc.is_connected and nc.connected_url is not None
        finally:
            await nc.close()


def test_connect_options_carry_every_kind_of_credential(tmp_path: Path) -> None:
    options = natsconn.connect_options(Settings(nats_token="t", nats_user="u", nats_password="p"), "n")
    assert (options["token"], options["user"], options["password"], options["name"]) == ("t", "u", "p", "n")
    with pytest.raises(natsconn.NatsConfigError, match="NATS_CREDS"):
        natsconn.connect_options(Settings(nats_creds=str(tmp_path / "missing.creds")), "n")
    with pytest.raises(natsconn.NatsConfigError, match="NATS_TLS_CA"):
        natsconn.connect_options(Settings(nats_tls_ca=str(tmp_path / "missing-ca.pem")), "n")


def test_nats_url_credentials_are_not_shown() -> None:
    shown = natsconn.display_servers(Settings(nats_url="nats://u:pw-in-url@127.0.0.1:4222, tls://h:4443"))
    assert shown == "nats://127.0.0.1:4222, tls://h:4443"


# ==== 6. Secrets never appear in logs, errors or /topics (§7) =======================================


@pytest.fixture
def captured_logs(capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """Everything the process logs: structlog (at DEBUG, rendered as in production) into a buffer, the
    standard library's records at the level gitfaas configures for them, and whatever reaches the fds."""
    buffer = io.StringIO()
    previous = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=buffer),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    caplog.set_level(logging.WARNING)

    def text() -> str:
        out, err = capfd.readouterr()
        return buffer.getvalue() + caplog.text + out + err

    try:
        yield text
    finally:
        structlog.configure(**previous)


GIT_TOKEN = "s3cr3t-g1t/t0ken+="


def secret_spellings(secret: str) -> list[str]:
    return [secret, quote(secret, safe=""), quote(secret), json.dumps(secret)[1:-1]]


ECHOING_GIT = """#!/bin/sh
# A git that repeats its whole command line in its error, as older versions and some helpers do.
if [ "$1" = version ]; then echo "git version 2.43.0"; exit 0; fi
echo "fatal: unable to access: git $*" >&2
exit 128
"""


@pytest.mark.parametrize("credential", ["GIT_PERSONAL_TOKEN", "password-in-GIT_URL"])
@pytest.mark.parametrize("git_program", ["real", "echoing"])
async def test_the_git_token_never_leaves_the_url_handed_to_git(
    nats_server: EmbeddedNats, tmp_path: Path, captured_logs: Any, monkeypatch: pytest.MonkeyPatch,
    git_program: str, credential: str,
) -> None:
    """Defence: the token is only put in the URL handed to git, and scrubbed from whatever git says."""
    for proxy in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)  # nothing but 127.0.0.1, refused at once
    if git_program == "echoing":
        fake = tmp_path / "fake-git"
        fake.write_text(ECHOING_GIT)
        fake.chmod(0o755)
        monkeypatch.setattr(git.Git, "GIT_PYTHON_GIT_EXECUTABLE", str(fake))
    port = free_port()
    if credential == "GIT_PERSONAL_TOKEN":
        url, token, secret = f"https://127.0.0.1:{port}/org/pipelines.git", GIT_TOKEN, GIT_TOKEN
    else:
        url, token, secret = f"https://someone:{quote(GIT_TOKEN, safe='')}@127.0.0.1:{port}/org/p.git", None, GIT_TOKEN
    settings = make_settings(nats_server, None, tmp_path, tmp_path, git_url=url, git_personal_token=token)
    async with running_stack(settings) as stack:
        status, topics = await stack.get_json("/topics")
        assert status == 200 and "git sync failed" in topics["error"] and "127.0.0.1" in topics["error"]
        status, refreshed = await stack.get_json("/refresh")
        assert status == 200 and "git sync failed" in refreshed["error"]
        shown = json.dumps(topics) + json.dumps(refreshed) + GitSync(settings).display_source
        logged = captured_logs()
    assert "git sync failed" in logged, "the failure itself is logged"
    for spelled in secret_spellings(secret):
        assert spelled not in shown, f"{spelled!r} in /topics"
        assert spelled not in logged, f"{spelled!r} in the logs"
    if git_program == "echoing":
        assert "***@127.0.0.1" in logged, "what git said is shown, with the secret blanked"


async def test_nats_password_and_bridge_token_are_never_logged(
    k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path, captured_logs: Any
) -> None:
    async with nats_with(tmp_path, "--user", "gitfaas", "--pass", NATS_PASSWORD) as server:
        settings = make_settings(server, k8s, repo.path, tmp_path, nats_user="gitfaas",
                                 nats_password=NATS_PASSWORD, bridge_token=TOKEN)
        await refused(settings.replace(nats_password=NATS_PASSWORD + "-wrong"))
        async with running_stack(settings) as stack:
            assert (await stack.publish("hello", "x", headers={"Authorization": "Bearer " + TOKEN[:-1]})).status == 401
            assert (await stack.publish("hello", "x", headers=AUTH)).status == 202
            await wait_for(lambda: k8s.jobs(), message="the Job")
            async with stack.http.get(stack.bridge_url + "/topics", headers=AUTH) as response:
                shown = await response.text()
            await server.stop()  # a disconnection and its errors get logged too
            await wait_for(lambda: not stack.bridge.nc.is_connected, message="the bridge to notice")
            await server.start()
            await wait_for(lambda: stack.bridge.nc.is_connected, message="the bridge to reconnect")
        logged = captured_logs()
    assert "nats" in logged.lower()
    for secret in (NATS_PASSWORD, TOKEN):
        for spelled in secret_spellings(secret):
            assert spelled not in logged and spelled not in shown, spelled
