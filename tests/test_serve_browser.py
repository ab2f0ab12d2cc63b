"""`qpm serve` in a real headless browser: Debian's Chromium driven by Playwright for Python.

The real server (``qpm serve`` subprocess, loopback) serves a real exported model whose class names are hostile
(``<script>alert(1)</script>``, ``$\\x$``, quotes and ampersands). Every page is opened, clicked through and
screenshotted under the test's tmp dir; any JS console error, page error or dialog fails the test. Playwright cannot
download its own browsers here, so the system Chromium is used (``.ci/run`` installs it with apt-get).

``test_every_page_kind_fits_every_width`` opens every page kind of a real trained run (overview, class, feature,
explain, confusion, misclassified, search, graph) at 400, 1400 and 3840 px: no horizontal overflow, no console error.
With ``QPM_SCREENSHOTS=DIR`` it writes their screenshots there (``docs/images/serve/`` holds the README's).
"""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

import pytest
from conftest import copy_run
from test_serve import HOSTILE, Server, served_model  # noqa: F401 - served_model is a fixture

pytestmark = pytest.mark.timeout(300)


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    exe = chromium_path()
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("Chromium is missing in CI: .ci/run installs Debian's chromium package")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(served_model, tmp_path_factory):  # noqa: F811
    srv = Server([str(served_model["onnx"]), "--device", "cpu"], tmp_path_factory.mktemp("browser-server"))
    yield srv
    srv.stop()


class Watched:
    """A page whose console errors, uncaught exceptions and dialogs (alert!) are recorded."""

    def __init__(self, browser, base: str, shots: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.base = base
        self.shots = shots
        self.problems: list[str] = []
        self.page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}")
                     if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("dialog", self._dialog)
        self.page.on("request", lambda r: self.problems.append(f"request outside the server: {r.url}")
                     if not r.url.startswith((base, "data:", "blob:")) else None)  # no CDN, nothing external

    def _dialog(self, dialog) -> None:
        self.problems.append(f"dialog ({dialog.type}): {dialog.message}")
        dialog.dismiss()

    def goto(self, path: str) -> None:
        resp = self.page.goto(self.base + path)
        assert resp is not None and resp.status == 200, path

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 5000
        return path

    def images_loaded(self, selector: str) -> int:
        """How many images under ``selector`` have loaded; fails on a broken one."""
        self.page.wait_for_function(
            "sel => Array.from(document.querySelectorAll(sel)).every(i => i.complete)", arg=selector)
        sizes = self.page.eval_on_selector_all(selector, "imgs => imgs.map(i => i.naturalWidth)")
        assert all(w > 0 for w in sizes), (selector, sizes)
        return len(sizes)

    def close(self) -> None:
        self.page.close()
        assert self.problems == [], self.problems


@pytest.fixture
def page(browser, server, tmp_path):
    watched = Watched(browser, server.url, tmp_path)
    yield watched
    watched.close()


def test_overview_click_class_then_feature(page):
    page.goto("/")
    p = page.page
    assert p.locator("#grid tbody tr").count() == 4
    assert p.locator("#grid td.on").count() == 12  # 4 classes x 3 features
    assert "<script>alert(1)</script>" in p.inner_text("#grid")  # shown as text, never run
    page.shot("overview")
    p.click("#grid tbody tr:nth-child(2) td:nth-child(3)")  # a cell of the second row opens that class
    p.wait_for_url("**/class/1")
    assert p.inner_text("h1") == HOSTILE[1]
    assert page.images_loaded(".protos img") == 3 * 4  # 3 features x 4 training prototypes
    assert p.locator(".protos rect.pbox").count() == 3 * 4  # each with its patch box
    page.shot("class")
    p.click(".feature-row a.chip[data-feature='2']")
    p.wait_for_url("**/feature/2")
    assert p.inner_text("h1") == "f2"
    assert page.images_loaded("#prototypes img") == 4
    users = p.locator("#users a").all_inner_texts()
    assert users == [HOSTILE[0], HOSTILE[1], HOSTILE[3]]
    page.shot("feature")
    p.click("#users a >> nth=0")  # the hostile class's own page: its name is text
    p.wait_for_url("**/class/0")
    assert p.inner_text("h1") == HOSTILE[0]
    page.shot("class-hostile")


def test_overview_search_and_column_links(page):
    page.goto("/")
    p = page.page
    p.fill("#class-search", "PLAIN")
    assert p.locator("#grid tbody tr:not(.hidden)").count() == 1
    assert p.inner_text("#search-count") == "1 of 4 classes"
    p.press("#class-search", "Enter")
    p.wait_for_url("**/class/3")
    page.goto("/")
    p.click("#grid thead th.col >> nth=3")  # the column header of the 4th feature (id 7)
    p.wait_for_url("**/feature/7")


def test_explain_upload_heatmaps_prototypes_and_compare(page, served_model):  # noqa: F811
    import httpx

    image = served_model["images"][0]
    api = httpx.post(page.base + "/api/explain", files={"file": (image.name, image.read_bytes(), "image/png")},
                     timeout=60).json()
    page.goto("/explain")
    p = page.page
    p.set_input_files("#file", str(image))
    p.wait_for_selector("#result:not([hidden])")
    first = p.locator("#topk tr >> nth=1").inner_text()
    assert first.startswith(api["top_k"][0]["class"])
    assert p.inner_text("#why-title") == "Why " + api["explained"]["class"]
    cards = p.locator("#features section.card")
    assert cards.count() == len(api["explained"]["features"])
    assert page.images_loaded("#features img.heat") == cards.count()
    assert page.images_loaded("#features .protos img") == 4 * cards.count()  # prototypes beside each heatmap
    runner_up = api["compare"]["class"]
    assert p.inner_text("#compare-title") == f"{api['explained']['class']} vs {runner_up}"
    # the opacity control drives every heatmap
    p.fill("#opacity", "20")
    assert abs(float(p.eval_on_selector("#features img.heat", "i => getComputedStyle(i).opacity")) - 0.2) < 1e-6
    page.shot("explain")
    # switch the compared class to the hostile one: the page asks the server again and names it as text
    target = 0 if api["explained"]["index"] != 0 else 1
    p.select_option("#compare-class", str(target))
    p.wait_for_function("t => document.getElementById('compare-title').textContent.endsWith(t)",
                        arg=" vs " + HOSTILE[target])
    summary = p.inner_text("#compare-summary")
    assert "Shared features" in summary and HOSTILE[target] in summary
    page.images_loaded("#compare-features img.heat")
    page.shot("explain-compare")
    # explain as another class
    p.select_option("#explain-class", "1")
    p.wait_for_function("t => document.getElementById('why-title').textContent.startsWith(t)", arg="Why " + HOSTILE[1])


def test_explain_drag_and_drop_and_bad_upload(page, served_model):  # noqa: F811
    page.goto("/explain")
    p = page.page
    data = base64.b64encode(served_model["images"][1].read_bytes()).decode()
    p.evaluate("""([b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, {type: 'image/png'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""", [data, "dropped.png"])
    p.wait_for_selector("#result:not([hidden])")
    assert p.inner_text("#status").startswith("dropped.png: ")
    # a text file is refused with the server's message (not a console error: the page handles it)
    p.evaluate("""() => {
        const dt = new DataTransfer();
        dt.items.add(new File(['not an image'], 'notes.txt', {type: 'text/plain'}));
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));
    }""")
    p.wait_for_function("() => document.getElementById('status').textContent.startsWith('Error 415')")
    assert p.locator("#result").is_hidden()
    page.shot("explain-error")
    # 415 from fetch is logged by Chromium as a failed resource load; it is the expected answer here
    page.problems = [m for m in page.problems if "415" not in m]


def test_docs_page_renders_offline(page):
    page.goto("/docs")
    p = page.page
    p.wait_for_selector(".swagger-ui .opblock", timeout=30000)
    assert p.locator(".opblock").count() >= 6
    page.shot("docs")


# --------------------------------------------------------------------------------- every page kind, every width
WIDTHS = (400, 1400, 3840)


@pytest.fixture(scope="module")
def shapes_server(trained_run, tmp_path_factory):
    """The session's trained run (real prototypes, 48 test images), exported with its adapter graph."""
    from qpmcli.export import export_onnx

    root = tmp_path_factory.mktemp("browser-shapes")
    run = copy_run(trained_run["run"], root / "shapes-run")
    export_onnx(run, settings=trained_run["settings"])
    srv = Server([str(run), "--device", "cpu"], root)
    image = root / "upload.png"
    trained_run["test"][3].image.convert("RGB").save(image)
    srv.image = image
    yield srv
    srv.stop()


def test_every_page_kind_fits_every_width(browser, shapes_server):
    import httpx

    base = shapes_server.url
    httpx.get(base + "/api/confusion", params={"wait": "true"}, timeout=120)  # evaluated once, before the pages
    feature = httpx.get(base + "/api/model", timeout=60).json()["feature_ids"][0]
    pages = {"overview": "/", "class": "/class/0", "feature": f"/feature/{feature}", "explain": "/explain",
             "confusion": "/confusion", "misclassified": "/misclassified", "search": "/search?q=circle",
             "graph": "/graph"}
    shots = os.environ.get("QPM_SCREENSHOTS")
    for width in WIDTHS:
        watched = Watched(browser, base, Path(shots or "."))
        p = watched.page
        p.set_viewport_size({"width": width, "height": 900})
        for kind, path in pages.items():
            watched.goto(path)
            if kind == "explain":
                p.set_input_files("#file", str(shapes_server.image))
                p.wait_for_selector("#result:not([hidden])")
            if kind == "class":  # the example heatmaps are drawn by the page (one explain call each)
                p.wait_for_function("() => document.querySelectorAll('#examples .tiles').length === "
                                    "document.querySelectorAll('#examples .example').length")
            p.wait_for_function("() => Array.from(document.images).every(i => i.complete)")
            scroll, inner = p.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
            assert scroll <= inner, (kind, width, scroll, inner)
            assert watched.problems == [], (kind, width, watched.problems)
            if shots:
                watched.shot(f"{kind}-{width}")
        watched.close()
