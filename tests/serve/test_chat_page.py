"""The chat page at / in a real headless Chromium (Debian's package, driven by Playwright): a streamed
answer equal to the API's for the same settings, tokens/s shown, the stop button, a new chat.
Screenshots go to test-artifacts/ (or $QUADRANT_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import openai
import pytest

sync_api = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium (scripts/install.sh test installs Debian's)")

MODEL = "smollm2:135m"
ARTIFACTS = Path(os.environ.get("QUADRANT_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1100, "height": 750})
        page.goto(server.url + "/")
        yield page
        browser.close()


def test_assets_are_served_by_quadrant(server):
    html = httpx.get(server.url + "/").text
    assert "/web/chat.js" in html and "http" not in html.split("<body>")[1]  # no CDN
    for asset in ("/web/chat.js", "/web/style.css"):
        assert httpx.get(server.url + asset).status_code == 200


def test_a_streamed_answer_matches_the_api(page, server):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    # The served model first (selected), then any other pulled model the server can load on demand.
    sync_api.expect(page.locator("#model option").first).to_have_text(MODEL)
    assert page.input_value("#model") == MODEL
    page.fill("#system", "You are a geography teacher.")
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "40")
    page.fill("#prompt", "What is the capital of France?")
    page.press("#prompt", "Enter")
    sync_api.expect(page.locator("#stats")).to_contain_text("tokens/s", timeout=60_000)
    answer = page.locator("#messages li.assistant").last.inner_text()
    page.screenshot(path=str(ARTIFACTS / "chat-answer.png"))
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    same = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0, top_p=1, messages=[
        {"role": "system", "content": "You are a geography teacher."},
        {"role": "user", "content": "What is the capital of France?"}])
    assert answer.strip() == same.choices[0].message.content.strip()
    assert page.locator("#error").inner_text() == ""


def test_stop_and_new_chat(page):
    page.fill("#temperature", "1")
    page.fill("#max_tokens", "2000")
    page.fill("#prompt", "Write a very long story about a dragon.")
    page.press("#prompt", "Enter")
    sync_api.expect(page.locator("#stop")).to_be_enabled()
    bubble = page.locator("#messages li.assistant").last
    sync_api.expect(bubble).not_to_have_text("", timeout=60_000)
    page.click("#stop")
    sync_api.expect(page.locator("#send")).to_be_enabled()
    sync_api.expect(page.locator("#stop")).to_be_disabled()
    stopped = bubble.inner_text()
    page.wait_for_timeout(1000)
    assert bubble.inner_text() == stopped  # nothing arrives after stop
    page.screenshot(path=str(ARTIFACTS / "chat-stopped.png"))
    page.click("#new_chat")
    sync_api.expect(page.locator("#messages li")).to_have_count(0)
