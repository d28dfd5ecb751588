"""The web app in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium; never
`playwright install`). Uploads, clicks, waits for results, checks that the page fetches nothing from
outside this machine, and saves a screenshot of each tab: to a temporary folder, or with
CAPTIONER_SCREENSHOTS=docs/screenshots to the README's pictures (the test never edits the tree unasked)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import pytest

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"{CHROMIUM} not installed: run `sudo apt-get install chromium` (or `make browser` as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


ROOT = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("CAPTIONER_SCREENSHOTS") or Path(__import__("tempfile").gettempdir()) / "captioner-screenshots")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", ""}
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_model):
    from captioner.app import ui
    from captioner.pipeline.load import default_model, load_captioner

    # the shipped model on the default path (the light bundle) when there is one: the screenshots go into the
    # README; else the tiny random one
    model = default_model() if (default_model() / "model.json").is_file() else tiny_model
    demo = ui.build_demo(load_captioner(model))
    port = free_port()
    ui.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--no-first-run", "--disable-dev-shm-usage"])
        context = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
        pg = context.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.requested = []  # every URL the page asked for
        pg.on("request", lambda req: pg.requested.append(req.url))
        pg.goto(app_url, wait_until="networkidle")
        try:
            yield pg
        finally:
            context.close()
            browser.close()


def shoot(pg, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    pg.wait_for_timeout(500)  # let transitions settle
    pg.screenshot(path=str(path), full_page=True)
    return path


def open_tab(pg, name: str) -> None:
    pg.get_by_role("tab", name=name).click()


def test_image_tab(page):
    from captioner.app.ui import example_images

    # an example, picked from the examples table
    page.locator('img[src*="chelsea.jpg"]').first.click()
    page.locator("#caption-button").click()
    page.wait_for_function("() => (document.querySelector('#caption textarea')?.value || '').trim().length > 0")
    page.locator("#attention img").first.wait_for()
    # an upload
    example = next(p for p in example_images() if "coffee" in p)
    page.locator("#image-input input[type=file]").set_input_files(example)
    page.wait_for_selector('#image-input img[src*="coffee"]')
    before = page.locator("#attention img").first.get_attribute("src")
    page.locator("#caption-button").click()
    page.wait_for_function("(before) => { const img = document.querySelector('#attention img');"
                           " return img && img.getAttribute('src') !== before; }", arg=before)
    caption = page.locator("#caption textarea").input_value().strip()
    assert caption
    items = page.locator("#attention img")
    items.first.wait_for()
    assert items.count() == len(caption.split())  # one heat map per word
    assert page.locator("#alternatives").get_by_text(caption, exact=True).count() >= 1
    assert_label_clear(page, "#attention")
    assert "uniform" in page.locator("#attention-bar").inner_text()  # the absolute scale's colour bar
    shoot(page, "image")
    # issue 24: the maps redraw on their own ranges when asked, and the colour bar says so
    before = page.locator("#attention img").first.get_attribute("src")
    page.locator("#attention-stretch input").check()
    page.wait_for_function("(before) => { const img = document.querySelector('#attention img');"
                           " return img && img.getAttribute('src') !== before; }", arg=before)
    assert "minimum" in page.locator("#attention-bar").inner_text()
    assert page.locator("#caption textarea").input_value().strip() == caption
    page.locator("#attention-stretch input").uncheck()


def assert_label_clear(pg, gallery: str) -> None:
    """Issue 25 item 11: the gallery's floating label does not cover its first row, and every item shows (no
    inner scroll box hides the last rows)."""
    box = pg.eval_on_selector(gallery, """g => { const lab = g.querySelector('label');
        const items = [...g.querySelectorAll('.thumbnail-item')], wrap = g.querySelector('.grid-wrap');
        return {label: lab.getBoundingClientRect().bottom, top: Math.min(...items.map(i => i.getBoundingClientRect().top)),
                hidden: wrap.scrollHeight > wrap.clientHeight + 2 && getComputedStyle(wrap).overflowY !== 'visible'}; }""")
    assert box["top"] >= box["label"] - 0.5 and not box["hidden"], box


def test_batch_tab(page, tmp_path):
    from captioner.app.ui import example_images

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    files = [*example_images(), str(broken)]
    open_tab(page, "Batch")
    page.locator("#batch-files input[type=file]").set_input_files(files)
    page.locator('#batch-files [aria-label="broken.jpg"]').wait_for()
    # item 11: the upload list says how many files it holds, and each row is in view or the list says to scroll
    page.locator("#batch-count").get_by_text(f"{len(files)} files selected").wait_for()
    count = page.locator("#batch-count").inner_text()
    rows = page.eval_on_selector("#batch-files .file-preview-holder", """h => { const b = h.getBoundingClientRect();
        return [...h.querySelectorAll('tr')].map(r => r.getBoundingClientRect().bottom <= b.bottom + 1); }""")
    assert len(rows) == len(files) and (all(rows) or "scroll" in count), (rows, count)
    page.locator("#batch-button").click()
    page.locator("#batch-table").get_by_text("broken.jpg").first.wait_for()
    assert page.locator("#batch-table").get_by_text("not an image", exact=False).count() >= 1
    page.locator("#batch-gallery img").nth(len(files) - 2).wait_for()
    assert page.locator("#batch-gallery img").count() == len(files) - 1
    page.locator('#batch-csv a[download="captions.csv"]').wait_for()
    table = page.locator("#batch-table").inner_text()
    cells = gallery_cells(page, "#batch-gallery")
    assert [c["text"].split(":")[0] for c in cells] == [Path(f).name for f in files[:-1]]
    assert all(c["text"].split(": ", 1)[1] in table for c in cells)  # the whole caption, as in the table
    assert_label_clear(page, "#batch-gallery")
    shoot(page, "batch")


def test_batch_one_photo_keeps_its_size(page):
    """One photo alone is not stretched over the whole gallery (it was, blurred, before issue 17 item 15)."""
    from captioner.app.ui import THUMB_SIDE, example_images

    open_tab(page, "Batch")
    page.locator("#batch-files button[aria-label='Clear']").first.click()
    page.locator("#batch-files input[type=file]").set_input_files(example_images()[:1])
    page.locator("#batch-button").click()
    page.wait_for_function("() => document.querySelectorAll('#batch-gallery .thumbnail-item').length === 1"
                           " && !document.querySelector('#batch-table').innerText.includes('broken.jpg')")
    (cell,) = gallery_cells(page, "#batch-gallery")
    assert max(cell["w"], cell["h"]) <= THUMB_SIDE + 0.5 and cell["text"].startswith(Path(example_images()[0]).name)


def gallery_cells(pg, gallery: str) -> list[dict]:
    """Each gallery cell's image sizes and caption (issue 17 item 15): the image is shown at most at its own
    size (never upscaled, so never blurry) and the caption is all there, below the image, not cut off."""
    cells = pg.eval_on_selector_all(f"{gallery} .thumbnail-item", """items => items.map(b => {
        const img = b.querySelector('img'), cap = b.querySelector('.caption-label');
        const box = b.getBoundingClientRect(), i = img.getBoundingClientRect(), c = cap.getBoundingClientRect();
        return {w: i.width, h: i.height, nw: img.naturalWidth, nh: img.naturalHeight, text: cap.textContent.trim(),
                cut: cap.scrollWidth > cap.clientWidth + 1 || cap.scrollHeight > cap.clientHeight + 1,
                below: c.top >= i.bottom - 1, inside: c.bottom <= box.bottom + 1 && c.right <= box.right + 1};
    })""")
    assert cells
    for c in cells:
        assert c["nw"] > 0 and c["w"] <= c["nw"] + 0.5 and c["h"] <= c["nh"] + 0.5, c  # not upscaled
        assert c["w"] >= min(c["nw"], 150) - 1, c  # and not shrunk into a sliver
        assert not c["cut"] and c["below"] and c["inside"] and not c["text"].endswith("…"), c
    return cells


def test_video_tab(page, tmp_path):
    from slideshow import photos, still, write

    clip = write(tmp_path / "photos.mp4", [(2, still(p)) for p in photos()[1][:3]])  # 160x120, 3 photos
    open_tab(page, "Video")
    page.locator("#video-input input[type=file]").set_input_files(str(clip))
    page.locator("#video-input video").first.wait_for(state="attached")
    page.locator("#video-button").click()
    page.locator("#video-frames img").nth(5).wait_for()
    assert page.locator("#video-frames img").count() == 6
    page.locator('#video-srt a[download="photos.srt"]').wait_for()
    cells = gallery_cells(page, "#video-frames")
    assert all(re.fullmatch(r"\d\d:\d\d\.\d \S.*", c["text"]) for c in cells), cells
    assert_label_clear(page, "#video-frames")
    shoot(page, "video")


def test_nothing_fetched_from_outside(page):
    outside = [u for u in page.requested
               if urlparse(u).scheme in ("http", "https", "ws", "wss") and urlparse(u).hostname not in LOCAL_HOSTS]
    assert not outside, f"the page fetched from outside this machine: {outside[:5]}"
