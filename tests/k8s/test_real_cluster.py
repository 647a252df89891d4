"""gitfaas against a real API server and Job controller (`make test-k8s`; see conftest.py).

Each numbered test is a finding of issue 14 that the emulator could not show; each failed before
the change that fixed it (the assertion that failed is named in its docstring).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client as k8s_client

from cli.authoring import validate
from consumer.jobwatch import FINALIZER
from consumer.service import Consumer
from gitfaas.embedded import EmbeddedNats, free_port
from gitfaas.settings import Settings
from tests.conftest import GitRepo, config_json, running_stack, wait_for
from tests.k8s.conftest import (
    ADMIN_KUBECONFIG,
    KUBECONFIG,
    NAMESPACE,
    delete_jobs,
    job,
    k8s_settings,
    kubeconfig_with_server,
    read_job,
    server_of,
)
from tests.test_deploy import REQUIRED_GRANTS


async def wait_state(stack: Any, request_id: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, Any]:
    store = stack.consumers[0].tracker.store
    reached, document = await store.wait(request_id, lambda d: d.get("state") in states, timeout)
    assert reached and document is not None, f"{request_id} never reached {states}: {document}"
    return document


async def publish(stack: Any, topic: str, body: str = "x") -> str:
    answer = await stack.publish(topic, body)
    assert answer.status == 202, await answer.text()
    return (await answer.json())["request_id"]


# ---- what works, kept working --------------------------------------------------------------------


async def test_apply_labels_field_manager_outcomes_and_finalizer(nats_server: EmbeddedNats, k8s_repo: GitRepo,
                                                                 tmp_path: Path, admin: k8s_client.ApiClient) -> None:
    async with running_stack(k8s_settings(nats_server, k8s_repo, tmp_path)) as stack:
        ok, bad = await publish(stack, "ok"), await publish(stack, "bad")
        done = await wait_state(stack, ok, ("succeeded",))
        failed = await wait_state(stack, bad, ("failed",))
        names = [done["documents"][0]["name"], failed["documents"][0]["name"]]
        try:
            assert "BackoffLimitExceeded" in failed["documents"][0]["reason"]
            assert not done["documents"][0].get("warnings"), "the example Job passes `restricted`"
            found = await read_job(admin, names[0])
            assert found is not None
            meta = found["metadata"]
            assert meta["labels"]["app.kubernetes.io/managed-by"] == "gitfaas"
            assert meta["labels"]["gitfaas.io/request-id"] == ok and meta["annotations"]["gitfaas.io/commit"]
            assert {m["manager"] for m in meta["managedFields"] if m["operation"] == "Apply"} == {"gitfaas"}
            # The outcome is stored, so the finalizer is gone (another process may be a moment late).
            await wait_for(lambda: _no_finalizer(admin, names[0]), timeout=10, message="the finalizer released")
        finally:
            await delete_jobs(admin, names)


async def _no_finalizer(admin: k8s_client.ApiClient, name: str) -> bool:
    found = await read_job(admin, name)
    return found is None or FINALIZER not in (found["metadata"].get("finalizers") or [])


async def test_the_role_of_manifests_base_grants_what_the_code_uses() -> None:
    """Every (group, resource, verb) the consumer's code calls is allowed to its ServiceAccount."""
    from kubernetes_asyncio import config as k8s_config

    configuration = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=KUBECONFIG, client_configuration=configuration)
    async with k8s_client.ApiClient(configuration) as api:
        review = k8s_client.AuthorizationV1Api(api)
        for group, resource, verb in sorted(REQUIRED_GRANTS):
            answer = await review.create_self_subject_access_review({"spec": {"resourceAttributes": {
                "group": group, "resource": resource, "verb": verb, "namespace": NAMESPACE}}})
            assert answer.status.allowed, f"{verb} {group}/{resource} in {NAMESPACE} is denied"
        denied = await review.create_self_subject_access_review({"spec": {"resourceAttributes": {
            "group": "", "resource": "secrets", "verb": "get", "namespace": NAMESPACE}}})
        assert not denied.status.allowed, "the consumer's Role grants more than it needs"


# ---- 1. a fixed-name Job whose template changed ------------------------------------------------


async def test_1_a_changed_template_is_a_sentence_and_the_job_stays_its_owners(
        nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path, admin: k8s_client.ApiClient) -> None:
    """Before: the dead letter's reason was the Status cut at 300 characters ("immutable" lost)."""
    name = f"fixed-{int(time.time())}"
    k8s_repo.commit({"config.json": config_json({"fixed": ["fixed.yaml"]}), "fixed.yaml": job(name)})
    async with running_stack(k8s_settings(nats_server, k8s_repo, tmp_path)) as stack:
        try:
            first = await publish(stack, "fixed", "one")
            await wait_state(stack, first, ("succeeded",))
            k8s_repo.commit({"fixed.yaml": job(name, command="echo changed")})
            await stack.get_json("/refresh")
            second = await publish(stack, "fixed", "two")
            dead = await wait_state(stack, second, ("dead",))
            assert dead["error"].startswith(f"Job {name} already exists (created by request {first}) with a "
                                            "different template"), dead["error"]
            assert "{{RANDOM}}" in dead["error"] and "immutable" in dead["error"]
            # The original template again: still another request's Job, still refused, never taken over.
            k8s_repo.commit({"fixed.yaml": job(name)})
            await stack.get_json("/refresh")
            third = await publish(stack, "fixed", "three")
            await wait_state(stack, third, ("dead",))
            found = await read_job(admin, name)
            assert found is not None and found["metadata"]["annotations"]["gitfaas.io/request-id"] == first
            assert found["metadata"]["labels"]["gitfaas.io/request-id"] == first
        finally:
            await delete_jobs(admin, [name])


# ---- 2. validate refuses what the API server refuses ------------------------------------------


async def test_2_validate_and_the_cluster_agree(tmp_path: Path) -> None:
    """Before: `gitfaas validate` said ok to all three documents the API server refuses."""
    repo = tmp_path / "repo"
    repo.mkdir()
    cases = {"upper.yaml": job("Upper-{{RANDOM}}"),
             "long.yaml": job("a-job-name-that-is-much-too-long-for-the-label-its-pods-carry-{{RANDOM}}"),
             "always.yaml": job().replace("restartPolicy: Never", "restartPolicy: Always")}
    (repo / "config.json").write_text(config_json({case.split(".")[0]: [case] for case in cases}))
    for file, text in cases.items():
        (repo / file).write_text(text)
    settings = Settings(executor="kubernetes", kubeconfig=KUBECONFIG, kube_namespace=NAMESPACE)
    out = io.StringIO()
    assert validate(settings, str(repo), out=out) == 1
    offline = out.getvalue()
    assert all(f"{file}:" in offline for file in cases), offline
    # --cluster: the API server itself, through server-side dry-run (each document on its own).
    from cli.authoring import _cluster_report
    from consumer.configuration import load_configuration

    for file, text in cases.items():
        single = tmp_path / f"single-{file}"
        single.mkdir()
        (single / "config.json").write_text(config_json({"t": [file]}))
        (single / file).write_text(text)
        config = load_configuration(single, "c" * 40, settings)
        problems, _warnings, unchecked = await _cluster_report(settings, config)
        assert unchecked is None and len(problems) == 1 and "dry-run" in problems[0], (file, problems)
    # And a good document passes both, creating nothing.
    good = tmp_path / "good"
    good.mkdir()
    (good / "config.json").write_text(config_json({"t": ["job.yaml"]}))
    (good / "job.yaml").write_text(job())
    out = io.StringIO()
    code = await asyncio.to_thread(lambda: validate(settings, str(good), out=out, cluster=True))  # `--cluster`
    assert code == 0, out.getvalue()


async def test_2_dry_run_on_load_refuses_a_commit(nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path,
                                                  admin: k8s_client.ApiClient) -> None:
    k8s_repo.commit({"ok.yaml": job().replace("restartPolicy: Never", "restartPolicy: Always")})
    settings = k8s_settings(nats_server, k8s_repo, tmp_path, dry_run_on_load=True)
    consumer = Consumer(settings.replace(git_cache_dir=str(tmp_path / "cache")))
    await consumer.start()
    try:
        assert consumer.config is None
        assert "restartPolicy" in str(consumer.repository.error) and "dry-run" in str(consumer.repository.error)
    finally:
        await consumer.stop(grace=1)


# ---- 3. a Job deleted by its TTL while no consumer ran ------------------------------------------


async def test_3_an_outcome_survives_ttl_while_the_consumer_is_down(
        nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path, admin: k8s_client.ApiClient) -> None:
    """Before: the Job was gone when the consumer came back, and the request stayed `applied`."""
    k8s_repo.commit({"ttl.yaml": job(ttl=0), "config.json": config_json({"ttl": ["ttl.yaml"]})})
    settings = k8s_settings(nats_server, k8s_repo, tmp_path)
    async with running_stack(settings) as stack:
        request_id = await publish(stack, "ttl")
        applied = await wait_state(stack, request_id, ("applied", "running", "succeeded"))
    name = applied["documents"][0]["name"]
    try:
        # No consumer now. The Job completes and its TTL deletes it: only the finalizer holds it.
        async def held() -> bool:
            found = await read_job(admin, name)
            return bool(found and found["metadata"].get("deletionTimestamp"))

        await wait_for(held, timeout=60, message="the TTL controller deleting the finished Job")
        async with running_stack(settings) as stack:
            document = await wait_state(stack, request_id, ("succeeded",), timeout=30)
            assert document["documents"][0]["state"] == "succeeded"
            await wait_for(lambda: _gone(admin, name), timeout=30, message="the Job gone once recorded")
    finally:
        await delete_jobs(admin, [name])


async def _gone(admin: k8s_client.ApiClient, name: str) -> bool:
    return await read_job(admin, name) is None


async def test_3_a_job_gone_without_its_outcome_is_unknown(
        nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path, admin: k8s_client.ApiClient) -> None:
    """Its finalizer removed by hand while no consumer ran: the request says `unknown`, and why."""
    k8s_repo.commit({"slow.yaml": job(command="sleep 1"), "config.json": config_json({"slow": ["slow.yaml"]})})
    settings = k8s_settings(nats_server, k8s_repo, tmp_path)
    async with running_stack(settings) as stack:
        request_id = await publish(stack, "slow")
        applied = await wait_state(stack, request_id, ("applied", "running"))
    name = applied["documents"][0]["name"]
    await delete_jobs(admin, [name])
    await wait_for(lambda: _gone(admin, name), timeout=30, message="the Job deleted")
    async with running_stack(settings) as stack:
        document = await wait_state(stack, request_id, ("unknown",), timeout=30)
        assert "outcome was never recorded" in document["error"]


# ---- 4. blocked Jobs and warnings ----------------------------------------------------------------


async def test_4_a_job_that_cannot_create_pods_says_why_and_warnings_are_stored(
        nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path, admin: k8s_client.ApiClient) -> None:
    """Before: `running` for ever with no reason; the Pod Security warning on apply was dropped."""
    privileged = job().replace("allowPrivilegeEscalation: false", "privileged: true")  # breaks `baseline`
    plain = job().replace("runAsNonRoot: true", "runAsNonRoot: false")  # only `restricted` warns
    k8s_repo.commit({"config.json": config_json({"priv": ["priv.yaml"], "plain": ["plain.yaml"]}),
                     "priv.yaml": privileged, "plain.yaml": plain})
    async with running_stack(k8s_settings(nats_server, k8s_repo, tmp_path)) as stack:
        blocked, warned = await publish(stack, "priv"), await publish(stack, "plain")
        store = stack.consumers[0].tracker.store
        reached, document = await store.wait(
            blocked, lambda d: "FailedCreate" in str((d.get("documents") or [{}])[0].get("reason")), 30)
        names = [(document or {}).get("documents", [{}])[0].get("name")]
        try:
            assert reached and document is not None, document
            assert "PodSecurity" in document["documents"][0]["reason"]
            done = await wait_state(stack, warned, ("succeeded",))
            names.append(done["documents"][0]["name"])
            assert any("PodSecurity" in w and "restricted" in w for w in done["documents"][0]["warnings"]), done
        finally:
            await delete_jobs(admin, [n for n in names if n])


# ---- 5. the stall signal ---------------------------------------------------------------------------


class Proxy:
    """A TCP proxy in front of the API server that can be cut: an API server outage, for real."""

    def __init__(self, target: str) -> None:
        host, _, port = target.removeprefix("https://").partition(":")
        self.target = (host, int(port or 443))
        self.port = free_port()
        self.up = True
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        self.up = False
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()


async def test_5_idle_time_is_not_stalled_time(nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path,
                                               admin: k8s_client.ApiClient) -> None:
    """Before: after an idle spell longer than STALL_SECONDS, an outage read as stalled at once."""
    proxy = Proxy(server_of(KUBECONFIG))
    await proxy.start()
    kubeconfig = kubeconfig_with_server(KUBECONFIG, f"https://127.0.0.1:{proxy.port}")
    settings = k8s_settings(nats_server, k8s_repo, tmp_path, kubeconfig=kubeconfig, stall_seconds=3,
                            apply_timeout_seconds=1)
    try:
        async with running_stack(settings) as stack:
            consumer = stack.consumers[0]
            await asyncio.sleep(4)  # idle, longer than STALL_SECONDS
            proxy.cut()  # the API server is unreachable from now on
            request_id = await publish(stack, "ok")
            loop = asyncio.get_running_loop()
            started = loop.time()
            while loop.time() - started < 2.0:
                assert not consumer.stalled, "stalled although work had waited less than STALL_SECONDS"
                await asyncio.sleep(0.1)
            await wait_for(lambda: consumer.stalled, timeout=10, message="the stall signal")
            proxy.up = True  # the API server is back: the message is applied, the signal clears
            await wait_state(stack, request_id, ("applied", "running", "succeeded"), timeout=60)
            await wait_for(lambda: not consumer.stalled, timeout=15, message="the stall signal to clear")
            done = await wait_state(stack, request_id, ("succeeded",))
            await delete_jobs(admin, [done["documents"][0]["name"]])
    finally:
        await proxy.stop()
        Path(kubeconfig).unlink(missing_ok=True)


# ---- 6. a dead message lists what it applied ----------------------------------------------------


async def test_6_a_dead_message_lists_its_applied_job_at_once(
        nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path, admin: k8s_client.ApiClient) -> None:
    """Before: the status had no documents when it went dead; the Job showed up later, unattributed."""
    config_map = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: cm-{{RANDOM}}\ndata: {a: b}\n"
    k8s_repo.commit({"config.json": config_json({"pair": ["ok.yaml", "cm.yaml"]}), "cm.yaml": config_map})
    async with running_stack(k8s_settings(nats_server, k8s_repo, tmp_path)) as stack:
        request_id = await publish(stack, "pair")
        document = await wait_state(stack, request_id, ("dead",))
        try:
            assert "Forbidden" in document["error"] and "configmaps" in document["error"]
            [entry] = document["documents"]
            assert entry["kind"] == "Job" and entry["function_uid"]
            assert entry["state"] in ("applied", "running", "succeeded")  # the watch may have been first
            final = await wait_state(stack, request_id, ("dead",))
            assert final["documents"][0]["name"] == entry["name"]
        finally:
            await delete_jobs(admin, [document["documents"][0]["name"]] if document.get("documents") else [])


# ---- 429: API Priority and Fairness ---------------------------------------------------------------


async def test_429_slows_the_whole_consumer(nats_server: EmbeddedNats, k8s_repo: GitRepo, tmp_path: Path,
                                            admin: k8s_client.ApiClient) -> None:
    """A priority level of one seat, rejecting what does not fit: the API server answers 429 with
    Retry-After; every apply then waits, nothing is dead-lettered, no delivery is spent."""
    flow = k8s_client.FlowcontrolApiserverV1Api(admin)
    name = f"gitfaas-test-{int(time.time())}"
    await flow.create_priority_level_configuration({
        "metadata": {"name": name}, "spec": {"type": "Limited", "limited": {
            "nominalConcurrencyShares": 1, "lendablePercent": 0, "borrowingLimitPercent": 0,
            "limitResponse": {"type": "Reject"}}}})
    await flow.create_flow_schema({
        "metadata": {"name": name}, "spec": {
            "priorityLevelConfiguration": {"name": name}, "matchingPrecedence": 100,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                "name": "gitfaas-consumer", "namespace": "gitfaas"}}],
                "resourceRules": [{"verbs": ["patch", "create"], "apiGroups": ["batch"], "resources": ["jobs"],
                                   "namespaces": ["*"]}]}]}})
    count = 200
    names: list[str] = []
    try:
        await asyncio.sleep(2)  # the API server picks the configuration up
        async with running_stack(k8s_settings(nats_server, k8s_repo, tmp_path)) as stack:
            executor: Any = stack.consumers[0].executor
            started = time.perf_counter()
            ids = await asyncio.gather(*(publish(stack, "ok", str(i)) for i in range(count)))
            store = stack.consumers[0].tracker.store
            documents = [await wait_state(stack, i, ("applied", "running", "succeeded"), timeout=240) for i in ids]
            seconds = time.perf_counter() - started
            names = [d["documents"][0]["name"] for d in documents]
            throttled = executor._throttle.throttled
            print(f"\n429 measurement: {count} Jobs in {seconds:.1f} s ({count / seconds:.0f}/s), "
                  f"{throttled} answers 429, apply limit now {int(executor._throttle.limit)}")
            assert throttled > 0, "the priority level did not throttle: nothing measured"
            attempts = [(await store.get(i) or {}).get("attempts") for i in ids]
            assert set(attempts) == {1}, "a 429 spent a delivery"
    finally:
        with contextlib.suppress(Exception):
            await flow.delete_flow_schema(name)
        with contextlib.suppress(Exception):
            await flow.delete_priority_level_configuration(name)
        await delete_jobs(admin, names)


def test_the_suite_was_given_two_identities() -> None:
    assert KUBECONFIG != ADMIN_KUBECONFIG, "GITFAAS_TEST_KUBECONFIG must be the consumer's, not the admin's"
    assert json.dumps(NAMESPACE)
