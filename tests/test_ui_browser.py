"""A real browser on the web app: headless Chromium (Playwright, the system's chromium) opens the playground,
submits a prompt, sees the routing chart and saves a screenshot. No request may leave the machine."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")

from helpers_ui import ui_run, ui_url  # noqa: E402,F401  (fixtures)

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (CI installs Debian's "
                                                          "chromium; `apt-get install chromium` to run this test)")


def test_playground_in_a_real_browser(ui_url, tmp_path):
    outside: list[str] = []

    def only_local(route):
        host = urlparse(route.request.url).hostname or ""
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", only_local)
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(ui_url, wait_until="domcontentloaded", timeout=60_000)

            page.get_by_role("tab", name="5 · Playground").click(timeout=60_000)
            prompt = page.locator("#dlp-prompt textarea")
            prompt.wait_for(state="visible", timeout=30_000)
            prompt.fill("What is 3 plus 4? What is the capital of France?")
            page.locator("#dlp-send").click()

            # the routing chart (a PNG drawn per sentence) and the per-sentence table appear
            chart = page.locator("#dlp-routing-chart img")
            chart.wait_for(state="visible", timeout=180_000)
            page.get_by_text("routing decision").first.wait_for(timeout=60_000)
            box = chart.bounding_box()
            assert box and box["width"] > 200 and box["height"] > 100, box
            natural = page.evaluate("el => [el.naturalWidth, el.naturalHeight]", chart.element_handle())
            assert natural[0] > 300 and natural[1] > 100, natural
            assert page.get_by_text("What is 3 plus 4?").count() >= 2  # chat bubble + routing table row
            chart.scroll_into_view_if_needed()
            shot = tmp_path / "playground.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            print(f"screenshot: {shot}")
            assert not errors, errors
        finally:
            browser.close()
    assert not outside, f"the page tried to reach the network: {outside}"
