"""The operator console in a real browser (Debian's Chromium driven by Playwright) against a real
server and worker on the demo model: an editor submits a fact and tries it, an admin rolls it back
through the confirmation, a reader sees no action and a forged POST is refused. Each page is saved
as a PNG under screenshots/console/ (not committed) for a person to look at."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from daemon_harness import Daemon
from server_harness import Server, make_token

from kb_daemon.demo import QUESTION, REPHRASE, easy_vqa_examples

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "screenshots" / "console"
# Flags for a closed network and a root user (the machine's Chromium notes).
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("Chromium is missing: .ci/run installs it with apt-get install chromium")
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=FLAGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def console(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("console") / "home", model="demo")
    d.kbctl("init")
    tokens = {role: make_token(d, f"{role}-ui", role) for role in ("reader", "editor", "admin")}
    server = Server(d, "--model", "demo")
    try:
        d.start_worker("up")
        server.start()
        yield d, server, tokens
    finally:
        if server.process is not None:
            server.stop()
        d.stop_workers()


def log_in(browser, server: Server, token: str):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.goto(f"{server.url}/ui/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{server.url}/ui/")
    return context, page


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


@pytest.mark.slow
def test_editor_admin_and_reader_in_the_console(browser, console, tmp_path):
    d, server, tokens = console
    rectangle = easy_vqa_examples()["rectangle"][0]
    ui = f"{server.url}/ui/models/demo"

    context, page = log_in(browser, server, tokens["editor"])
    assert "editor-ui (editor)" in page.inner_text("header")
    shot(page, "01-models")
    page.get_by_role("link", name="demo").first.click()
    page.get_by_role("link", name="Submit a fact").click()
    page.set_input_files("#image", str(rectangle))
    page.locator("#preview").wait_for(state="visible")  # the chosen image, previewed before upload
    page.get_by_label("Question", exact=True).fill(QUESTION)
    page.get_by_label("New answer").fill("oblong box")
    page.get_by_label("Rephrasings of the question (one per line)").fill(REPHRASE)
    shot(page, "02-submit")
    page.get_by_role("button", name="Submit").click()
    page.wait_for_url(re.compile(r".*/jobs/\d+$"))
    page.wait_for_selector("#job-version", timeout=120_000)  # the page refreshes itself until the job ends
    assert "done" in page.inner_text("#job-status")
    shot(page, "03-job")
    version = page.inner_text("#job-version")
    page.goto(f"{ui}/versions")
    assert page.get_by_role("link", name=version).first.is_visible()
    shot(page, "04-timeline")
    page.get_by_role("link", name=version).first.click()
    thumbnail = page.locator("li.fact img").first
    thumbnail.wait_for()
    assert page.evaluate("(img) => img.naturalWidth", thumbnail.element_handle()) > 0
    shot(page, "05-version")
    page.locator("li.fact a").first.click()
    assert "oblong box" in page.inner_text("main")
    shot(page, "06-fact")
    page.get_by_role("link", name="Try it with this image").click()
    page.get_by_role("button", name="Ask").click()
    assert page.inner_text("#answer") == "oblong box"
    assert page.locator("#fired").is_visible()
    assert page.inner_text("#unedited") == "rectangle"
    shot(page, "07-try")
    assert page.locator("text=Roll back").count() == 0  # an editor may not roll back
    context.close()

    context, page = log_in(browser, server, tokens["admin"])
    page.goto(f"{ui}/versions/0")
    page.get_by_role("link", name="Roll back to v0…").click()
    assert "Facts that leave (1)" in page.inner_text("main")
    shot(page, "08-confirm-rollback")
    page.get_by_role("button", name="Confirm rollback").click()
    page.wait_for_selector("#job-version", timeout=120_000)
    page.goto(f"{ui}/try")
    page.set_input_files("#image", str(rectangle))
    page.get_by_label("Question", exact=True).fill(QUESTION)
    page.get_by_role("button", name="Ask").click()
    assert page.inner_text("#answer") == "rectangle"
    shot(page, "09-try-after-rollback")
    history = d.kbctl("history", "--json")
    assert [(v["kind"], v["actor"], v["source"]) for v in history[:2]] == [
        ("rollback", "admin-ui", "ui:rollback"), ("edit", "editor-ui", "ui")]
    context.close()

    context, page = log_in(browser, server, tokens["reader"])
    page.goto(f"{ui}/versions/0")
    assert page.locator("text=Roll back").count() == 0
    assert page.get_by_role("link", name="Submit a fact").count() == 0
    csrf = page.locator("input[name=csrf]").first.get_attribute("value")
    forged = page.request.post(f"{ui}/rollback", form={"csrf": csrf, "version": "1"})
    assert forged.status == 403 and "needs admin" in forged.text()
    wrong_csrf = page.request.post(f"{ui}/submit", multipart={"csrf": "forged", "question": "q", "answer": "a"})
    assert wrong_csrf.status == 403
    shot(page, "10-reader")
    context.close()
    assert len(d.kbctl("history", "--json")) == len(history)  # nothing the reader tried was recorded
    for token in tokens.values():
        assert token not in server.log()
