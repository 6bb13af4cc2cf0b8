"""The playground page (/ui) in a real browser: headless system Chromium driven by Playwright against a live server
with the tiny model and API keys. Without the key the page's API call is refused; with it, an uploaded image is
edited, the progress bar reaches the end, the result, the timings and the optimisation report appear and the
session's history holds the run; then one of the server's LoRA adapters (the page's picker, from GET /v1/models)
runs at the scale given and is reported. FLUX_PLAYGROUND_SCREENSHOT=1 saves docs/playground.png (so CI leaves the tree
alone). Playwright's own browser download is not used: the test launches the Chromium of the system (apt: chromium)
and is skipped, saying so, only where there is none."""
from __future__ import annotations

import os
import re
import shutil

import pytest

from kontext_server.api.routes.playground import ASSETS
from tests.helpers import ROOT, LiveServer

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser")) if p), None)
KEY = "playground-test-key-0123456789"
PAGE_DIR = ROOT / "kontext_server" / "api" / "playground"


def test_the_page_loads_nothing_from_elsewhere():
    """Works offline: every script, style and image the page names is its own (no CDN, no external URL)."""
    for name in ASSETS:
        text = (PAGE_DIR / name).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), name
        assert "http://" not in text and "https://" not in text, name
    html = (PAGE_DIR / "index.html").read_text()
    assert '<script src="/ui/playground.js">' in html and 'href="/ui/playground.css"' in html


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on this machine (Debian: apt-get install chromium); "
                                             ".ci/run installs it")
def test_an_edit_from_the_page_in_a_headless_browser_then_with_an_adapter(cache_dir, tmp_path):
    from playwright.sync_api import sync_playwright

    from tests.helpers import png_b64
    from tests.lora.adapters import make_library

    image = tmp_path / "car.png"
    import base64

    image.write_bytes(base64.b64decode(png_b64(320, 256, (180, 40, 40))))
    keys = tmp_path / "keys.txt"
    keys.write_text(KEY + "\n")
    source = make_library(cache_dir, tmp_path / "adapters")
    loras = tmp_path / "loras"
    loras.mkdir()
    for name in ("style", "big"):  # big's rank is larger than the slots --lora-max-rank makes: not offered
        shutil.copy(source / f"{name}.safetensors", loras)
    with LiveServer(cache_dir, "--api-keys", str(keys), "--lora-dir", str(loras), "--lora-max-rank", "8") as server, \
            sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(server.url + "/")
            assert page.url == server.url + "/ui"  # / redirects to the page
            page.set_input_files("#images", str(image))
            assert page.locator("#inputs img").count() == 1
            page.fill("#prompt", "make the car blue")
            page.select_option("#tier", "low")  # fast: fp8 (not on a CPU) + DPM-Solver++
            page.fill("#steps", "4")
            page.fill("#seed", "7")
            page.select_option("#size-mode", "wxh")
            page.fill("#width", "256")
            page.fill("#height", "256")

            page.click("#submit")  # no key yet: the API refuses the page's call
            page.wait_for_function("document.getElementById('status').textContent.includes('401')", timeout=60_000)
            assert "invalid_api_key" in page.text_content("#status")

            page.fill("#api-key", KEY)
            page.click("#submit")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=180_000)
            assert page.eval_on_selector("#progress", "p => p.value") == 100
            src = page.get_attribute("#result", "src")
            assert src.startswith("data:image/png;base64,")
            assert page.eval_on_selector("#result", "img => [img.naturalWidth, img.naturalHeight]") == [256, 256]
            timings = dict(zip(page.locator("#timings td:nth-child(1)").all_text_contents(),
                               page.locator("#timings td:nth-child(2)").all_text_contents()))
            assert float(timings["total"]) > 0 and float(timings["transformer"]) > 0
            ran = page.locator("#optimizations tr").all_text_contents()
            assert len(ran) == 9 and any(row.startswith("dpm_solverapplied") for row in ran)
            assert page.locator("#history li").count() == 1
            assert page.locator("#compare-inputs img").count() == 1
            assert "width and height as given" in page.text_content("#size-reason")
            assert not any(row.startswith("lora") for row in ran)

            # the server's adapters, from GET /v1/models: one picked at a scale runs and is reported
            page.wait_for_selector("#lora-1 option[value=style]", state="attached", timeout=30_000)
            assert page.locator("#lora-1 option").all_text_contents() == ["none", "style"]
            page.select_option("#lora-1", "style")
            page.fill("#lora-1-scale", "0.5")
            page.click("#submit")
            page.wait_for_function("document.querySelectorAll('#history li').length === 2", timeout=180_000)
            page.wait_for_function("document.getElementById('status').textContent.startsWith('done')",
                                   timeout=180_000)
            ran = page.locator("#optimizations tr").all_text_contents()
            assert "lora stylescale 0.5rank 4" in ran, ran
            assert page.get_attribute("#result", "src") != src  # same seed and input: the adapter changed it
            if os.environ.get("FLUX_PLAYGROUND_SCREENSHOT"):
                page.screenshot(path=str(ROOT / "docs" / "playground.png"), full_page=True)
        finally:
            browser.close()
