"""The messages a consumer holds: at most MAX_CONCURRENCY applied at once and twice as many held; a slow
apply is not redelivered meanwhile (one keep-alive loop for all of them); a shutdown starts none."""

from __future__ import annotations

from pathlib import Path

from consumer.service import Consumer
from gitfaas.embedded import EmbeddedNats
from tests.conftest import EmulatorHandle, GitRepo, make_settings, running_stack, wait_for

ACK_WAIT = 1.0
HELD = 3.5  # the API server holds the apply this long: three and a half times ACK_WAIT


async def test_a_slow_apply_is_not_redelivered_while_it_runs(nats_server: EmbeddedNats, k8s: EmulatorHandle,
                                                              repo: GitRepo, tmp_path: Path) -> None:
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, ack_wait_seconds=ACK_WAIT)
    async with running_stack(settings) as stack:
        slow = k8s.emulator.slow_next(HELD, None, path=r"/apis/batch/v1/namespaces/default/jobs/.*")
        quick = await stack.publish("hello")
        assert quick.status == 202
        request_id = (await quick.json())["request_id"]

        async def applied() -> dict | None:
            status, document = await stack.get_json(f"/requests/{request_id}")
            return document if status == 200 and document.get("state") == "applied" else None

        document = await wait_for(applied, timeout=HELD + 10, message="the held apply to be recorded")
        assert slow.hits == 1, f"the message was applied {slow.hits} times: redelivered while its apply ran"
        assert document["attempts"] == 1
        assert len(k8s.jobs()) == 1


async def test_a_process_applies_max_concurrency_messages_at_once_and_holds_twice_as_many(
        nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path) -> None:
    """MAX_CONCURRENCY=2: two applies at a time; two more messages are claimed while they wait for their
    turn (four `pending`: the two being applied too), the rest stay in the stream for other processes."""
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, max_concurrency=2)
    async with running_stack(settings) as stack:
        slow = k8s.emulator.slow_next(3.0, None, path=r"/apis/batch/v1/namespaces/default/jobs/.*")
        ids = [(await (await stack.publish("hello")).json())["request_id"] for _ in range(6)]

        async def states() -> list[str]:
            found = []
            for request_id in ids:
                code, document = await stack.get_json(f"/requests/{request_id}")
                found.append(document.get("state") if code == 200 else "-")
            return found

        await wait_for(lambda: slow.active == 2, message="two applies held by the API server")
        held = await wait_for(lambda: _counted(states(), "pending", 4), timeout=2.5, message="two more claimed")
        assert held.count("-") == 2, f"the process holds four messages, not more: {held}"
        assert slow.active == 2, "the first two are still being applied: the other two wait for their turn"
        await wait_for(lambda: _counted(states(), "applied", 6), timeout=40, message="all six applied")
        assert slow.most_active == 2 and slow.hits == 6
        assert len(k8s.jobs()) == 6


async def _counted(states, state: str, count: int) -> list[str] | None:
    found = await states
    return found if found.count(state) == count else None


async def test_a_stopping_consumer_applies_none_of_the_messages_still_waiting_for_their_turn(
        nats_server: EmbeddedNats, k8s: EmulatorHandle, repo: GitRepo, tmp_path: Path) -> None:
    """SIGTERM while one message is applied and a second waits for its turn (MAX_CONCURRENCY=1): the first
    finishes, the second goes back to the stream untouched, and the next consumer applies it once."""
    settings = make_settings(nats_server, k8s, repo.path, tmp_path, max_concurrency=1)
    async with running_stack(settings) as stack:
        slow = k8s.emulator.slow_next(2.0, None, path=r"/apis/batch/v1/namespaces/default/jobs/.*")
        first, second = [(await (await stack.publish("hello")).json())["request_id"] for _ in range(2)]

        async def state(request_id: str) -> str | None:
            code, document = await stack.get_json(f"/requests/{request_id}")
            return document.get("state") if code == 200 else None

        await wait_for(lambda: slow.active == 1, message="the first apply held by the API server")
        await wait_for(lambda: _is(state(second), "pending"), message="the second claimed, waiting for its turn")
        consumer = stack.consumers.pop()
        await consumer.stop(grace=10)
        assert slow.hits == 1, "the second message was started during the shutdown"
        assert len(k8s.jobs()) == 1 and await state(first) == "applied"

        replacement = Consumer(settings.replace(git_cache_dir=f"{settings.git_cache_dir}-2"))
        await replacement.start()
        try:
            await wait_for(lambda: _is(state(second), "applied"), timeout=20, message="the second applied")
        finally:
            await replacement.stop(grace=2)
        assert slow.hits == 2 and len(k8s.jobs()) == 2


async def _is(found, expected: str) -> bool:
    return await found == expected
