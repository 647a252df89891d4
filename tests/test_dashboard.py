"""Issue 16: the dashboard at `GET /`, in a real headless Chromium.

The browser is the system's (Debian's `chromium` package, or `GITFAAS_CHROMIUM`), driven by Playwright
from PyPI with `executable_path`: nothing is downloaded at test time. Without Chromium these tests
are skipped, saying how to install it; `.ci/run` installs it, so CI always runs them.

One system serves the whole module, as `gitfaas up` would run it: embedded NATS, the bridge and a
consumer with the local executor (every Job a real process), in this test's event loop, on a copy of
examples/pipeline with a few topics added (a step that fails, a step that waits, a parameter default
holding markup). Each test opens its own browser context (its own session storage).

`GITFAAS_UPDATE_SCREENSHOT=1` makes the timeline test write docs/dashboard-run.png (the README's).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio

from bridge.app import Bridge, serve
from gitfaas.embedded import EmbeddedNats, free_port
from tests.conftest import Stack, make_settings, running_stack, wait_for
from tests.processes import ROOT, processes_mentioning

INSTALL = ("apt-get install -y chromium (Debian/Ubuntu, as root), or set GITFAAS_CHROMIUM to a Chromium "
           "binary; .ci/run installs it")


def find_chromium() -> str | None:
    given = os.environ.get("GITFAAS_CHROMIUM")
    if given:
        return given if Path(given).exists() else None
    return next((found for name in ("chromium", "chromium-browser") if (found := shutil.which(name))), None)


CHROMIUM = find_chromium()
if CHROMIUM is None:
    pytest.skip(f"the dashboard's browser tests need Chromium, which is not installed here: {INSTALL}",
                allow_module_level=True)
try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright, expect
except ImportError:  # pragma: no cover — the test extra brings it
    pytest.skip("the dashboard's browser tests need Playwright: make test installs it (requirements/test.txt)",
                allow_module_level=True)

pytestmark = pytest.mark.asyncio(loop_scope="module")

TOKEN = "dashboard-test-token-5c1e"
XSS = "<img src=x onerror=alert(1)>"
SCRIPT_PARAM = "<script>alert('param')</script>"
CANCEL_MARKER = "gitfaas-dashboard-cancel-marker"
GREEN = "rgb(31, 157, 85)"  # --ok in app.css
RED = "rgb(214, 69, 65)"  # --bad


def job(name: str, code: str, *, extra_args: tuple[str, ...] = ()) -> str:
    args = ", ".join(json.dumps(a) for a in (sys.executable, "-c", code, *extra_args))
    return f"""\
apiVersion: batch/v1
kind: Job
metadata:
  name: {name}-{{{{RANDOM}}}}
spec:
  backoffLimit: 0
  template:
    spec:
      restartPolicy: Never
      containers:
        - name: main
          image: python:3.11-slim
          command: [{args}]
          env:
            - name: GREETING
              value: "{{{{greeting}}}}"
"""


FAIL_CODE = ("import sys; print('reading sensor 7', flush=True); print(" + json.dumps(XSS) + ", flush=True); "
             "print('sensor 7 unreadable: checksum mismatch', file=sys.stderr, flush=True); sys.exit(3)")
WAIT_CODE = "import time; print('waiting', flush=True); time.sleep(120)"
LATER_CODE = "print('handled later', flush=True)"


def pipeline_copy(folder: Path) -> Path:
    """examples/pipeline as it is, plus the topics these tests need (one of them not yet: timeToLater)."""
    repo = folder / "pipeline"
    shutil.copytree(ROOT / "examples" / "pipeline", repo, ignore=shutil.ignore_patterns("__pycache__"))
    config = json.loads((repo / "config.json").read_text())
    config["topics"] += [
        {"name": "timeToFail", "configs": ["fail.yaml"], "params": {"greeting": SCRIPT_PARAM}},
        {"name": "timeToWait", "configs": ["wait.yaml"], "params": {"greeting": "hi"}},
    ]
    (repo / "config.json").write_text(json.dumps(config, indent=1))
    (repo / "fail.yaml").write_text(job("fail", FAIL_CODE))
    (repo / "wait.yaml").write_text(job("wait", WAIT_CODE, extra_args=(CANCEL_MARKER,)))
    (repo / "later.yaml").write_text(job("later", LATER_CODE))
    return repo


def add_later_topic(repo: Path) -> None:
    config = json.loads((repo / "config.json").read_text())
    if not any(t["name"] == "timeToLater" for t in config["topics"]):
        config["topics"].append({"name": "timeToLater", "configs": ["later.yaml"], "params": {"greeting": "x"}})
        (repo / "config.json").write_text(json.dumps(config, indent=1))


class System:
    def __init__(self, stack: Stack, repo: Path, nats_url: str, token_url: str) -> None:
        self.stack = stack
        self.url = stack.bridge_url
        self.repo = repo
        self.nats_url = nats_url
        self.token_url = token_url  # the same system behind a second bridge that has BRIDGE_TOKEN set

    async def publish(self, topic: str, body: bytes = b"hello") -> str:
        response = await self.stack.publish(topic, body)
        assert response.status == 202, await response.text()
        return str((await response.json())["request_id"])

    async def get(self, path: str) -> Any:
        code, data = await self.stack.get_json(path)
        assert code == 200, (path, data)
        return data

    async def dead_letter(self, topic: str, body: bytes, headers: dict[str, str] | None = None) -> int:
        """A message published straight to NATS on a topic the configuration lacks: it goes dead."""
        before = {d["seq"] for d in (await self.get("/dead-letters"))["dead_letters"]}
        nc = await nats.connect(self.nats_url)
        try:
            await nc.jetstream().publish(f"gitfaas.topics.{topic}", body, headers=headers)
        finally:
            await nc.close()

        async def arrived() -> int | None:
            letters = [d for d in (await self.get("/dead-letters"))["dead_letters"]
                       if d["seq"] not in before and d["topic"] == topic]
            return letters[0]["seq"] if letters else None

        return int(await wait_for(arrived, timeout=20, message=f"a dead letter on {topic}"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def system(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    tmp = tmp_path_factory.mktemp("dashboard")
    repo = pipeline_copy(tmp)
    server = EmbeddedNats(tmp / "nats")
    await server.start()
    try:
        settings = make_settings(server, None, repo, tmp, executor="local", state_dir=str(tmp / "state"))
        async with running_stack(settings) as stack:
            guarded = Bridge(settings.replace(bridge_token=TOKEN, bridge_port=free_port()))
            await guarded.start()
            runner = await serve(guarded, "127.0.0.1", guarded.settings.bridge_port)
            try:
                yield System(stack, repo, server.url, f"http://127.0.0.1:{guarded.settings.bridge_port}")
            finally:
                await runner.cleanup()
                await guarded.stop()
    finally:
        await server.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


class Watched:
    """A page and what it said: dialogs (none may open), script errors, console errors (CSP reports)."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)

    async def _dialog(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    def assert_clean(self) -> None:
        assert not self.dialogs, f"a dialog opened: {self.dialogs}"
        # A 401 answered to a data route shows as a failed resource in the console: that is the token test's point.
        problems = [e for e in self.errors if "401" not in e]
        assert not problems, problems


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Browser) -> AsyncIterator[Watched]:
    context: BrowserContext = await browser.new_context(viewport={"width": 1280, "height": 820})
    context.set_default_timeout(20_000)
    watched = Watched(await context.new_page())
    try:
        yield watched
    finally:
        await context.close()
    watched.assert_clean()


# ---- overview ----------------------------------------------------------------------------------


async def test_the_overview_shows_the_example_topics_and_its_first_load_is_light(system: System, page: Watched) -> None:
    p = page.page
    topics = [t["name"] for t in (await system.get("/topics"))["topics"]]
    assert {"timeToCollect", "timeToUncompress", "timeToConvert", "timeToSurvey"} <= set(topics)

    started = time.perf_counter()
    await p.goto(system.url + "/")
    await expect(p.locator("#topics tbody tr")).to_have_count(len(topics))
    rendered_ms = await p.evaluate("performance.now()")  # since navigation start, at the moment the topics show
    wall_ms = (time.perf_counter() - started) * 1000
    transfer = await p.evaluate("""() => {
        const nav = performance.getEntriesByType('navigation')[0];
        const resources = performance.getEntriesByType('resource');
        return {document: nav.transferSize, resources: resources.map(r => [r.name, r.transferSize]),
                total: nav.transferSize + resources.reduce((sum, r) => sum + r.transferSize, 0)};
    }""")
    print(f"\ndashboard first load of the overview: {transfer['total'] / 1024:.1f} KB transferred "
          f"({len(transfer['resources']) + 1} requests: document {transfer['document']} B, "
          + ", ".join(f"{name.split('/', 3)[-1]} {size} B" for name, size in transfer["resources"])
          + f"); topics rendered {rendered_ms:.0f} ms after navigation start ({wall_ms:.0f} ms wall, from goto)")
    assert transfer["total"] < 200 * 1024, transfer

    for name in topics:
        await expect(p.locator(f'#topics tr[data-topic="{name}"]')).to_contain_text(name)
    await expect(p.locator('#topics tr[data-topic="timeToCollect"]')).to_contain_text("collect.yaml")
    await expect(p.locator('#topics tr[data-topic="timeToCollect"]')).to_contain_text("MESSAGE")
    # A parameter default holding markup is shown as the text it is.
    await expect(p.locator('#topics tr[data-topic="timeToFail"]')).to_contain_text(SCRIPT_PARAM)
    assert await p.locator("#topics script").count() == 0
    commit = (await system.get("/topics"))["commit"]
    await expect(p.locator("#commit")).to_have_text(commit[:12])
    await expect(p.locator("#count-in-flight .n")).to_have_text("0")
    await expect(p.locator("#count-dead .n")).to_have_text(str((await system.get("/stats"))["dead_letters"]))

    response = await p.request.get(system.url + "/")
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy


# ---- runs and the timeline -----------------------------------------------------------------------


async def test_a_published_run_appears_live_and_its_timeline_ends_in_three_green_steps(
        system: System, page: Watched) -> None:
    p = page.page
    await p.goto(system.url + "/#/runs")
    await expect(p.locator("#live")).to_have_text("live")
    await p.evaluate("window.__sameDocument = true")
    run_id = await system.publish("timeToCollect", b'{"rows": 40}')

    row = p.locator(f'#runs-body tr[data-run="{run_id}"]')
    await expect(row).to_be_visible()  # arrived by the event stream: no reload
    await expect(row).to_have_attribute("data-state", "succeeded", timeout=60_000)
    await expect(row.locator("td").nth(5)).to_have_text("3")
    assert await p.evaluate("window.__sameDocument === true"), "the page was reloaded"

    await row.locator("a").click()
    await expect(p.locator("#run-state")).to_have_text("succeeded")
    steps = p.locator("#timeline .tl-row")
    await expect(steps).to_have_count(3)
    assert [await steps.nth(i).locator(".topic").text_content() for i in range(3)] == [
        "timeToCollect", "timeToUncompress", "timeToConvert"]
    for i in range(3):
        await expect(steps.nth(i)).to_have_attribute("data-state", "succeeded")
        colour = await steps.nth(i).locator(".tl-work").evaluate("e => getComputedStyle(e).backgroundColor")
        assert colour == GREEN, colour
    # Bars follow each other in time: each step starts after its parent was published.
    lefts = [await steps.nth(i).locator(".tl-bar").evaluate("e => e.getBoundingClientRect().left") for i in range(3)]
    assert lefts[0] <= lefts[1] <= lefts[2], lefts

    await steps.nth(2).click()
    await expect(p.locator("#step-logs")).to_contain_text("wrote")
    await expect(p.locator("#step-jobs")).to_contain_text("convert-")
    await p.evaluate("document.getElementById('toast').hidden = true")
    shot = await p.screenshot(full_page=True)
    if os.environ.get("GITFAAS_UPDATE_SCREENSHOT"):
        (ROOT / "docs").mkdir(exist_ok=True)
        (ROOT / "docs" / "dashboard-run.png").write_bytes(shot)


async def test_a_failing_step_is_red_with_its_reason_and_logs(system: System, page: Watched) -> None:
    p = page.page
    run_id = await system.publish("timeToFail")
    await p.goto(system.url + f"/#/runs/{run_id[:8]}")  # a unique prefix works too
    await expect(p.locator("#run-state")).to_have_text("failed", timeout=30_000)
    step = p.locator("#timeline .tl-row").first
    await expect(step).to_have_attribute("data-state", "failed")
    assert await step.locator(".tl-work").evaluate("e => getComputedStyle(e).backgroundColor") == RED
    await expect(p.locator("#run-failure")).to_contain_text("timeToFail")

    await step.click()
    reason = (await system.get(f"/requests/{run_id}"))["error"]
    assert reason
    await expect(p.locator("#step-reason")).to_have_text(reason)
    logs = p.locator("#step-logs")
    await expect(logs).to_contain_text("reading sensor 7")
    await expect(logs).to_contain_text("checksum mismatch")
    await expect(logs).to_contain_text(XSS)  # a log line holding markup stays text
    assert await p.locator("#step-logs img").count() == 0


async def test_cancel_on_a_running_run_stops_it(system: System, page: Watched) -> None:
    p = page.page
    run_id = await system.publish("timeToWait")
    await p.goto(system.url + f"/#/runs/{run_id}")
    step = p.locator("#timeline .tl-row").first
    await expect(step).to_have_attribute("data-state", "running", timeout=30_000)
    await wait_for(lambda: processes_mentioning(CANCEL_MARKER), timeout=20, message="the waiting Job's process")
    cancel = p.locator("#cancel")
    await expect(cancel).to_be_enabled()

    await cancel.click()
    await expect(p.locator("#run-state")).to_have_text("cancelled", timeout=20_000)
    await expect(step).to_have_attribute("data-state", "cancelled")
    await expect(cancel).to_be_disabled()
    await wait_for(lambda: not processes_mentioning(CANCEL_MARKER), timeout=20, message="the Job's process to end")
    assert (await system.get(f"/runs/{run_id}"))["state"] == "cancelled"


# ---- dead letters --------------------------------------------------------------------------------


async def test_a_dead_letter_is_redriven_from_the_page(system: System, page: Watched) -> None:
    p = page.page
    seq = await system.dead_letter("timeToLater", b'{"later": true}')
    dead_request = next(d for d in (await system.get("/dead-letters"))["dead_letters"] if d["seq"] == seq)["request_id"]

    # The topic is added to the repository; the overview's Refresh loads it.
    add_later_topic(system.repo)
    await p.goto(system.url + "/")
    await expect(p.locator("#count-dead .n")).not_to_have_text("0")
    await p.locator("#refresh").click()
    await expect(p.locator('#topics tr[data-topic="timeToLater"]')).to_be_visible()

    await p.goto(system.url + "/#/dead")
    row = p.locator(f'#dead-body tr[data-seq="{seq}"]')
    await expect(row).to_contain_text("timeToLater")
    await row.click()
    await expect(p.locator("#letter-error")).to_contain_text("not in the configuration")
    await expect(p.locator("#letter-body")).to_have_text('{"later": true}')

    await row.locator("button.redrive").click()
    await expect(row).to_have_count(0)
    await expect(p.locator("#toast")).to_contain_text(f"Dead letter {seq} redriven as request")

    async def redriven() -> dict[str, Any] | None:  # a new request, linked to the dead one, that succeeds
        code, run = await system.stack.get_json(f"/runs/{dead_request}")
        done = [r for r in run.get("requests", []) if r.get("parent") == dead_request and r["state"] == "succeeded"]
        return done[0] if code == 200 and done else None

    request = await wait_for(redriven, timeout=30, message="the redriven request to succeed")
    assert request["topic"] == "timeToLater"


async def test_a_body_holding_markup_is_shown_as_text_and_no_dialog_fires(system: System, page: Watched) -> None:
    p = page.page
    seq = await system.dead_letter("timeToNowhere", XSS.encode(),
                                   headers={"Gitfaas-Param-note": "<script>alert(2)</script>"})
    await p.goto(system.url + "/#/dead")
    row = p.locator(f'#dead-body tr[data-seq="{seq}"]')
    await row.click()
    body = p.locator("#letter-body")
    await expect(body).to_have_text(XSS)
    await expect(p.locator("#letter-headers")).to_contain_text("<script>alert(2)</script>")
    assert await p.locator("#letter img, #letter script").count() == 0
    await p.wait_for_timeout(300)  # an onerror handler would have fired by now
    assert page.dialogs == [], page.dialogs

    # Purge asks first; "Keep them" keeps them.
    await p.locator("#purge").click()
    await expect(p.locator("#purge-confirm")).to_be_visible()
    await p.locator("#purge-no").click()
    await expect(row).to_be_visible()
    await p.locator("#purge").click()
    await p.locator("#purge-yes").click()
    await expect(p.locator("#dead-body tr[data-seq]")).to_have_count(0)
    assert (await system.get("/dead-letters"))["count"] == 0


# ---- the token -----------------------------------------------------------------------------------


async def test_with_a_token_the_page_without_it_shows_the_prompt_and_no_data(system: System, page: Watched) -> None:
    p = page.page
    urls: list[str] = []
    p.on("request", lambda r: urls.append(r.url))
    await p.goto(system.token_url + "/")
    await expect(p.locator("#token-prompt")).to_be_visible()
    await expect(p.locator("#main")).to_be_empty()
    text = await p.locator("body").inner_text()
    assert "timeToCollect" not in text and "Commit" not in text

    # State-changing routes refuse a request without the token.
    for path in ("/refresh", "/dead-letters/purge", "/dead-letters/redrive", "/runs/abcdefgh/cancel"):
        response = await p.request.post(system.token_url + path)
        assert response.status == 401, (path, response.status)
    assert (await p.request.get(system.token_url + "/topics")).status == 401
    assert (await p.request.get(system.token_url + "/ui/app.js")).status == 200  # files hold no data

    await p.locator("#token-input").fill("not-the-token")
    await p.locator("#token-form button").click()
    await expect(p.locator("#token-error")).to_have_text("The bridge refused that token.")
    await p.locator("#token-input").fill(TOKEN)
    await p.locator("#token-form button").click()
    await expect(p.locator('#topics tr[data-topic="timeToCollect"]')).to_be_visible()
    assert not [url for url in urls if TOKEN in url], "the token never travels in a URL"
    assert await p.evaluate("document.cookie") == ""
    await p.goto(system.token_url + "/#/runs")  # a new page load: the token is still in this tab's session
    await expect(p.locator("#live")).to_have_text("live")
    await expect(p.locator("#token-prompt")).to_be_hidden()


async def test_the_dashboards_files_are_package_data() -> None:
    """An installed wheel (and so the image, which `pip install .`s) carries bridge/static."""
    text = (ROOT / "pyproject.toml").read_text()
    assert 'bridge = ["static/*"]' in text
    names = {path.name for path in (ROOT / "bridge" / "static").iterdir()}
    assert {"index.html", "app.js", "app.css"} <= names
    total = sum((ROOT / "bridge" / "static" / name).stat().st_size for name in names)
    assert total < 100 * 1024, total
