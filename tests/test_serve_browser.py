"""The search page of ``idml serve`` in headless Chromium (Playwright driving the system's
Chromium): upload or drop an image, results and the confidence render, re-ranking toggles, a click
on an indexed image searches with it, the low-confidence state shows; no console errors and
no request leaves the server. Under CI (IDML_REQUIRE_BROWSER=1) it must run, not skip.

``IDML_SCREENSHOT=path.png`` also saves the page's screenshot there (the README's picture).
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from conftest import CHROMIUM_FLAGS, REQUIRE_BROWSER

from idml.data.digits import digit_image
from idml.serving.app import create_app
from idml.serving.embedder import load
from idml.serving.index import load_index
from idml.serving.service import SearchService

if REQUIRE_BROWSER:
    from playwright.sync_api import expect, sync_playwright
else:
    _pw = pytest.importorskip("playwright.sync_api")
    expect, sync_playwright = _pw.expect, _pw.sync_playwright


#: Drops a PNG (its bytes as a list) on the page's drop zone, as a user dragging a file would.
DROP = """bytes => {
  const data = new DataTransfer();
  data.items.add(new File([new Uint8Array(bytes)], "drop.png", {type: "image/png"}));
  document.getElementById("drop").dispatchEvent(
    new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
}"""


@pytest.fixture(scope="module")
def server(digits_served) -> Iterator[tuple[str, SearchService]]:
    """The digits run served by uvicorn on 127.0.0.1 (a free port), in a thread."""
    folder, ckpt = digits_served
    service = SearchService(load_index(folder), load(ckpt, device="cpu"), show_paths=True)
    config = uvicorn.Config(create_app(service), host="127.0.0.1", port=0, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", service
    srv.should_exit = True
    thread.join(timeout=10)


def test_search_page_in_chromium(chromium, server, tmp_path):
    base, service = server
    query = tmp_path / "seven.png"
    digit_image("digits/test/0007").resize((96, 96)).save(query)
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS[1:])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(base + "/")
        page.wait_for_selector("#gallery button img")
        assert f"{len(service.index)} items" in page.inner_text("#info")

        page.set_input_files("#file", str(query))
        page.wait_for_selector("#results .hit")
        assert page.locator("#results .hit").count() == 8
        assert "re-ranked by the introspective similarity" in page.inner_text("#results-title")
        assert page.locator("#confidence").inner_text().startswith(("Confident", "Low"))
        expected = service.search(*service.embed(_decoded(query)), k=8, rerank="introspective")
        first = page.locator("#results .hit").first.inner_text()
        assert f"#1 {expected['hits'][0]['label_name']}" in first
        for img in page.locator("#results img").all():
            assert img.evaluate("i => i.complete && i.naturalWidth > 0")

        dropped = digit_image("digits/test/0100").resize((80, 80))  # drag and drop a file
        buf = io.BytesIO()
        dropped.save(buf, format="PNG")
        with page.expect_response("**/search") as answer:
            page.evaluate(DROP, list(buf.getvalue()))
        assert answer.value.status == 200 and answer.value.json()["query"]["upload"] == "drop.png"
        expect(page.locator("#query-label")).to_have_text("drop.png")
        expect(page.locator("#results .hit")).to_have_count(8)

        page.uncheck("#rerank")
        expect(page.locator("#results-title")).to_contain_text("by cosine")

        worst = int(np.argmax(service.scores))  # the least sure indexed image: flagged
        page.evaluate("id => fetch('/items/' + id).then(r => r.json()).then(searchItem)", worst)
        page.wait_for_selector("#confidence.low")
        assert "Low confidence" in page.inner_text("#confidence")
        expect(page.locator("#results .hit")).to_have_count(8)

        page.locator("#gallery button").nth(3).click()  # an indexed image, by clicking it
        page.wait_for_selector("#confidence.ok, #confidence.low")
        expect(page.locator("#query-label")).to_contain_text("item 3:")
        page.wait_for_selector("#results .hit.same")
        page.screenshot(path=str(tmp_path / "serve.png"), full_page=True)
        if os.environ.get("IDML_SCREENSHOT"):
            page.screenshot(path=os.environ["IDML_SCREENSHOT"], full_page=True)
        browser.close()
    assert errors == []
    foreign = [u for u in requests if not u.startswith((base + "/", "blob:", "data:"))]
    assert foreign == []
    assert any(u.endswith("/search") for u in requests)


def _decoded(path: Path):
    from PIL import Image

    with Image.open(path) as img:
        img.load()
        return img.copy()
