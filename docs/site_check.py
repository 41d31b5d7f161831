"""The built site, opened in a real browser: `python -m pytest docs/site_check.py` (run by `nox -s docs`).

Headless Chromium (Debian's ``chromium`` package, driven by Playwright through its executable path:
Playwright never downloads a browser here) opens ``site/index.html`` and every page linked from it
straight from the disk, as a learner would. Each page must load without a console error or an
uncaught script error, every image on it (the figures, the benchmark charts) must have decoded to a
real size, and a full-page screenshot of each goes to ``site/_screenshots/``.

Skipped, with the reason, where chromium, Playwright or the built site is missing. The site's folder
is ``$MINILIB_SITE`` or ``site/`` at the repository's root.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(os.environ.get("MINILIB_SITE", ROOT / "site")).resolve()
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
PAGE_TIMEOUT_MS = 30_000  # a page that does not load in 30 s fails rather than hangs


def _chromium() -> str | None:
    explicit = os.environ.get("MINILIB_CHROMIUM")
    if explicit:
        return explicit
    return next((p for p in map(shutil.which, CHROMIUM_NAMES) if p), None)


def _pages() -> list[Path]:
    """index.html, then every page the navigation lists (the lessons, beyond them, questions, bench)."""
    import re

    index = SITE / "index.html"
    links = re.findall(r'href="([^"#?]+\.html)"', index.read_text())
    pages = [index]
    for link in links:
        page = (SITE / link).resolve()
        if page.is_file() and page not in pages and SITE in page.parents:
            pages.append(page)
    return pages


@pytest.fixture(scope="module")
def browser():
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "no chromium on PATH (Debian: apt-get install chromium); set MINILIB_CHROMIUM to use another"
        )
    if not (SITE / "index.html").is_file():
        pytest.skip(f"no site at {SITE}: build it first with `nox -s docs` (python -m docs.build)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
    )
    with sync_api.sync_playwright() as p:
        # --no-sandbox: chromium's sandbox needs user namespaces, which containers and CI often lack
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"], timeout=PAGE_TIMEOUT_MS)
        yield b
        b.close()


def pytest_generate_tests(metafunc):
    if "page_path" in metafunc.fixturenames:
        pages = _pages() if (SITE / "index.html").is_file() else [SITE / "index.html"]
        metafunc.parametrize("page_path", pages, ids=[p.relative_to(SITE).as_posix() for p in pages])


def test_page_loads_without_errors_and_its_figures_decode(browser, page_path):
    """The page opens from file:// with no console error and no uncaught exception, every <img> on it
    decodes to a width and height above zero, and a screenshot of the whole page is saved."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on("console", lambda m: errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
    page.on("requestfailed", lambda r: errors.append(f"failed to load {r.url}: {r.failure}"))
    try:
        page.goto(page_path.as_uri(), wait_until="load", timeout=PAGE_TIMEOUT_MS)
        images = page.evaluate(
            """async () => Promise.all([...document.images].map(async img => {
                   try { await img.decode(); } catch (e) { /* reported below as size 0 */ }
                   return {src: img.getAttribute('src'), w: img.naturalWidth, h: img.naturalHeight};
               }))"""
        )
        shots = SITE / "_screenshots"
        shots.mkdir(exist_ok=True)
        name = page_path.relative_to(SITE).as_posix().replace("/", "__").removesuffix(".html") + ".png"
        page.screenshot(path=str(shots / name), full_page=True, timeout=PAGE_TIMEOUT_MS)
    finally:
        page.close()
    assert not errors, f"{page_path.name}: " + "; ".join(errors)
    broken = [i["src"] for i in images if not (i["w"] > 0 and i["h"] > 0)]
    assert not broken, f"{page_path.name}: images that did not decode: {broken}"
    assert len(images) == page_path.read_text().count("<img "), "every <img> of the HTML is on the page"
