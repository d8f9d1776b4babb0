"""The chat page in a real headless Chromium (Debian `chromium`, driven by Playwright; nothing downloaded), on a
server with an API key and feedback collection on: the browser gives the key as its Basic password, the page
sends a message and watches the reply stream in, then judges a blinded A/B pair whose record is found on disk."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from chatforge.inference.sampling import SamplingParams
from chatforge.serving.app import create_app
from chatforge.serving.local import background_server
from chatforge.serving.worker import ModelRegistry
from conftest import save_tiny_models

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(os.environ.get("CHATFORGE_SCREENSHOT", "/tmp/chatforge_serve_page.png"))
KEY = "browser-key"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)"
)


def _seeded(route):
    """Adds a seed to the page's request: a random model's sampled reply can otherwise end at once and come
    back in one piece (greedy, this one replies nothing), which would make the streaming check a coin toss."""
    route.continue_(post_data=json.dumps({**route.request.post_data_json, "seed": 7}))


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("serve_browser")
    specs = save_tiny_models(root, tiny_tokenizer, ["sft", "ppo"])
    app = create_app(ModelRegistry.load(specs, max_queue=8), SamplingParams(max_new_tokens=24), data_dir=root / "data",
                     api_key=KEY, collect_feedback=True)
    with background_server(app) as url:
        yield url, root / "data"


def test_chat_page_streams_a_reply_and_records_an_ab_choice(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, data_dir = server
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            assert browser.new_context().request.get(url).status == 401  # no key, no page
            page = browser.new_page(viewport={"width": 1100, "height": 760},
                                    http_credentials={"username": "tester", "password": KEY})
            page.goto(url)
            page.wait_for_function("document.querySelectorAll('#model option').length === 2")
            page.wait_for_selector("#ab-toggle:not([hidden])")  # the server collects feedback
            assert page.title() == "chatforge"

            page.route("**/v1/chat/completions", _seeded)
            page.fill("#temperature", "1.0")
            page.fill("#max-tokens", "24")
            page.fill("#prompt", "Hello! How are you today?")
            page.click("#send")
            reply = page.locator(".message.assistant").first
            reply.wait_for(state="attached")
            page.wait_for_selector(".message.assistant[data-state=done]", timeout=30_000)
            assert int(reply.get_attribute("data-chunks")) > 1, "the reply arrived in several streamed pieces"
            assert reply.inner_text().strip()

            page.check("#ab-mode")
            page.select_option("#model-b", "ppo")
            page.fill("#annotator", "browser-tester")
            page.fill("#prompt", "Can you tell me a joke?")
            page.click("#send")
            page.wait_for_selector("#ab-panel:not([hidden])", timeout=30_000)
            chrome = page.inner_text("#ab-panel")  # the panel without the sampled replies, which may hold any text
            for reply_id in ("#reply-a", "#reply-b"):
                chrome = chrome.replace(page.inner_text(reply_id), "")
            assert "sft" not in chrome and "ppo" not in chrome
            page.screenshot(path=str(SCREENSHOT), full_page=True)  # the blinded pair, before the choice
            answered = all(page.inner_text(reply_id).strip() for reply_id in ("#reply-a", "#reply-b"))
            page.click(f"#ab-panel button[data-choice={'B' if answered else 'tie'}]")  # an empty reply: no preference
            page.wait_for_selector("#status[data-recorded]", timeout=10_000)
            status = page.inner_text("#status")
            page.screenshot(path=str(SCREENSHOT.with_name(SCREENSHOT.stem + "_after.png")), full_page=True)
        finally:
            browser.close()

    assert "A was" in status and "recorded" in status
    ratings = [json.loads(line) for line in (data_dir / "human_ratings.jsonl").read_text().splitlines()]
    assert len(ratings) == 1
    rating = ratings[0]
    assert rating["origin"] == "web" and rating["annotator"] == "browser-tester"
    assert set(rating["replies"]) == {"sft", "ppo"} and rating["winner"] in ("sft", "ppo")
    assert rating["prompt"][-1] == {"role": "user", "content": "Can you tell me a joke?"}
    assert rating["prompt"][0] == {"role": "user", "content": "Hello! How are you today?"}
