"""The chapter as a reader sees it: the static site in headless Chromium, and a notebook
run in JupyterLab with its slider moved.

Needs Debian's ``chromium`` and ``chromium-driver`` (``scripts/test.sh`` installs them when it
can) and the ``selenium`` package. Where no browser can be installed the tests skip, saying so.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from companion.book import load_book, render_html

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="no headless Chromium here (Debian packages chromium and "
                              "chromium-driver); scripts/test.sh installs them where apt-get "
                              "is available"),
]


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(120)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The executed chapter (the committed notebooks) rendered as the book command does."""
    book = load_book(ROOT / "book.toml")
    book.build_dir = tmp_path_factory.mktemp("build")
    index = render_html(book, committed=True, log=lambda *_: None)
    return book, index


def _expected_figures(notebook: Path) -> int:
    nb = nbformat.read(notebook, as_version=4)
    return sum("image/png" in out.get("data", {}) for cell in nb.cells
               if cell.cell_type == "code" for out in cell.outputs)


def check_site(driver, index: Path, book) -> list[str]:
    """Open the contents page and every chapter; return what a reader would find wrong."""
    from selenium.webdriver.common.by import By

    problems = []
    driver.get(index.as_uri())
    links = driver.find_elements(By.CSS_SELECTOR, "li a")
    listed = [(a.text, a.get_attribute("href")) for a in links]
    ids = [text.split(" ", 1)[0] for text, _ in listed]
    if ids != [c.id for c in book.chapters]:
        problems.append(f"contents page lists {ids}, the book has {[c.id for c in book.chapters]}")
    for chapter, (_, href) in zip(book.chapters, listed):
        driver.get(href)
        rendered = driver.execute_script(
            "return document.querySelector('.jp-Notebook, .jp-Cell') !== null")
        if not rendered:
            problems.append(f"{chapter.id}: page {href} did not render a notebook")
            continue
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth]);")
        drawn = sum(1 for complete, width in images if complete and width > 0)
        expected = _expected_figures(chapter.notebook)
        if drawn < expected or drawn < len(images):
            problems.append(f"{chapter.id}: {drawn} of {max(expected, len(images))} figures "
                            "rendered")
    return problems


def test_every_chapter_page_renders_with_its_figures(driver, site):
    book, index = site
    assert check_site(driver, index, book) == []


def test_the_check_fails_on_a_missing_page_and_a_broken_figure(driver, site, tmp_path):
    book, index = site
    broken = tmp_path / "html"
    shutil.copytree(index.parent, broken)
    missing = book.chapters[2]
    (broken / f"{missing.stem}.html").unlink()
    damaged = book.chapters[1]
    page = broken / f"{damaged.stem}.html"
    html = page.read_text(encoding="utf-8")
    garbage = base64.b64encode(b"not a png at all").decode()
    corrupted, n = re.subn(r'(<img[^>]*src=")data:image/png;base64,[^"]+',
                           rf"\1data:image/png;base64,{garbage}", html, count=1)
    assert n == 1, "no figure found to corrupt"
    page.write_text(corrupted, encoding="utf-8")
    problems = check_site(driver, broken / "index.html", book)
    assert any(p.startswith(f"{missing.id}: page") for p in problems), problems
    assert any(p.startswith(f"{damaged.id}:") and "figures rendered" in p
               for p in problems), problems


# ----------------------------------------------------------------------------- JupyterLab


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a copy of 3.1.1 with the smoke profile's parameters put in (as
    papermill would), so a run takes seconds."""
    import papermill

    book = load_book(ROOT / "book.toml")
    chapter = book.chapter("3.1.1")
    work = tmp_path_factory.mktemp("lab")
    (work / "notebooks").mkdir()
    target = work / "notebooks" / chapter.notebook.name
    (work / "benchmarks").symlink_to(ROOT / "benchmarks")  # 3.1.1 plots a saved benchmark
    parameters = dict(book.profile("smoke").parameters_for("3.1.1"),
                      output_dir=str(work / "build"), cache_dir=str(work / "cache"))
    papermill.execute_notebook(str(chapter.notebook), str(target), parameters=parameters,
                               prepare_only=True, kernel_name=book.kernel)
    port, token = _free_port(), "browser-test"
    log = open(work / "lab.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ip=127.0.0.1", f"--ServerApp.token={token}", f"--ServerApp.root_dir={work}",
         "--LabApp.expose_app_in_browser=True", "--allow-root",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    deadline = time.monotonic() + 120
    import urllib.request

    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"JupyterLab did not start: {(work / 'lab.log').read_text()[-2000:]}")
            time.sleep(0.5)
    yield f"http://127.0.0.1:{port}/lab/tree/notebooks/{target.name}?token={token}", work
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _wait(condition, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_jupyterlab_runs_the_notebook_and_the_slider_redraws_the_figure(driver, lab):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    url, work = lab
    driver.get(url)
    _wait(lambda: driver.execute_script(
        "const app = window.jupyterapp; const w = app && app.shell.currentWidget;"
        "return !!(w && w.sessionContext && w.sessionContext.session &&"
        " w.sessionContext.session.kernel);"), 120, "the notebook and its kernel")
    driver.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    # "done" when every code cell has run and the kernel is idle; the error's text as soon
    # as a cell fails (Run All stops there)
    progress = (
        "const w = window.jupyterapp.shell.currentWidget;"
        "const cells = w.content.widgets.filter(c => c.model.type === 'code');"
        "for (const c of cells) { for (let i = 0; i < c.model.outputs.length; i++) {"
        "  const o = c.model.outputs.get(i).toJSON();"
        "  if (o.output_type === 'error') return 'error: ' + o.ename + ': ' + o.evalue; } }"
        "return cells.length > 0 && cells.every(c => c.model.executionCount !== null) &&"
        " w.sessionContext.session.kernel.status === 'idle' ? 'done' : null;")
    try:
        outcome = _wait(lambda: driver.execute_script(progress), 600, "every cell to run")
    finally:
        driver.save_screenshot(str(work / "lab.png"))  # what the reader would see, for a failure
    assert outcome == "done", f"{outcome} (screenshot: {work / 'lab.png'})"
    slider = _wait(lambda: driver.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle"),
                   60, "the temperature slider")[0]

    def figure():
        images = driver.find_elements(By.CSS_SELECTOR, ".widget-output img")
        return images[-1].get_attribute("src") if images else None

    before = _wait(figure, 60, "the slider's figure")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", slider)
    slider.click()
    for _ in range(10):
        slider.send_keys(Keys.ARROW_RIGHT)
    _wait(lambda: figure() not in (None, before), 60, "the figure to change after the slider moved")
