"""report.html in a real browser: Debian's headless Chromium loads a page rendered from an output folder written
by engine's own writers (gold labels as answers, no model), and the plots are in the DOM it built and on screen."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from report_fixtures import (
    EXPECTED,
    GOLD,
    ROOT,
    gold_answers,
    with_errors,
    write_output_folder,
)

from engine.reporting.evaluate import evaluate, to_markdown, write_evaluation
from engine.reporting.html import (
    CRITERION_COLOURS,
    FUNNEL_COLOURS,
    REPORT_HTML,
    write_report_html,
)
from engine.job import load_job

BROWSERS = ("chromium", "chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--mute-audio"]
WINDOW = (1100, 6000)
BROWSER_SECONDS = 90
INSTALL_SECONDS = 600


def find_chromium() -> tuple[str | None, str]:
    """The chromium binary, installing Debian's package when it is missing and we may; else (None, why)."""
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if found:
        return found, ""
    if not shutil.which("apt-get"):
        return None, "chromium is not installed and apt-get is not available to install it"
    if os.geteuid() != 0:
        return None, "chromium is not installed and installing it with apt-get needs root (run: apt-get install chromium)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
            subprocess.run(command, check=True, capture_output=True, timeout=INSTALL_SECONDS, env=env)
    except (subprocess.SubprocessError, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        return None, f"chromium is not installed and `apt-get install chromium` failed: {exc} {detail.decode(errors='replace')[-300:]}"
    found = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    return found, "" if found else "apt-get installed chromium but no chromium binary is on PATH"


class Dom(HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def with_class(self, name: str, tag: str) -> list[dict]:
        return [a for t, a in self.tags if t == tag and name in (a.get("class") or "").split()]

    def svg(self, ident: str) -> dict | None:
        return next((a for t, a in self.tags if t == "svg" and a.get("id") == ident), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    path, why = find_chromium()
    if path is None:
        pytest.skip(why)
    return path


@pytest.fixture(scope="module")
def job():
    return load_job(ROOT / "jobs" / "apixaban.yaml")


@pytest.fixture(scope="module")
def report_page(job, tmp_path_factory) -> Path:
    """report.html of a synthetic run (16 notes, 3 error rows) after `engine eval` has run on it."""
    folder = tmp_path_factory.mktemp("browser-run")
    answers = with_errors(gold_answers(job, notes=16), 3)
    store, _, _ = write_output_folder(folder, job, answers)
    evaluation = evaluate(job, answers, pq.read_table(GOLD), pq.read_table(EXPECTED), draws=100)
    write_evaluation(evaluation, store, to_markdown(evaluation, job))
    write_report_html(store, job)
    return folder / REPORT_HTML


def browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    command = [chromium, *FLAGS, f"--user-data-dir={profile}", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, page.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=BROWSER_SECONDS, cwd=profile, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def dom(chromium, report_page, tmp_path_factory) -> Dom:
    result = browse(chromium, report_page, tmp_path_factory.mktemp("chromium-profile"), "--dump-dom")
    assert "<svg" in result.stdout, result.stdout[:500]
    return Dom(result.stdout)


def test_the_browser_builds_every_plot(dom, job):
    for chart in ("status", "funnel", "criteria", "answers", "grounding", "eval-plot"):
        assert dom.svg(chart) is not None, f"no <svg id={chart}> in the DOM Chromium built"
    assert len(dom.with_class("funnel-bar-remaining", "rect")) == len(job.criteria)
    assert len(dom.with_class("funnel-bar-excluded", "rect")) == len(job.criteria)
    rows = [a["id"] for t, a in dom.tags if t == "g" and a.get("id", "").startswith("funnel-")]
    assert rows == [f"funnel-{c.id}" for c in job.criteria]
    assert len(dom.with_class("criterion-bar-met", "rect")) == len(job.criteria)
    assert len(dom.with_class("answer-bar-error", "rect")) == len(job.questions)
    histograms = dom.with_class("histogram", "svg")
    assert len(histograms) == sum(q.type == "numeric" for q in job.questions)
    assert dom.with_class("histogram-bin", "rect")
    assert dom.with_class("eval-point", "circle")
    assert [t for t, _ in dom.tags].count("script") == 0


def test_the_plots_are_drawn_on_screen(chromium, report_page, tmp_path_factory):
    Image = pytest.importorskip("PIL.Image", reason="Pillow is needed to read the screenshot's pixels")
    profile = tmp_path_factory.mktemp("chromium-shot")
    shot = profile / "report.png"
    browse(chromium, report_page, profile, f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == WINDOW
    colours = image.getcolors(maxcolors=WINDOW[0] * WINDOW[1])
    counts = {f"#{r:02X}{g:02X}{b:02X}": n for n, (r, g, b) in colours}
    for name, colour in {"funnel: still in": FUNNEL_COLOURS["remaining"], "funnel: excluded": FUNNEL_COLOURS["excluded"],
                         "criteria: not met": CRITERION_COLOURS["not_met"]}.items():
        assert counts.get(colour, 0) > 200, f"{name} ({colour}) is not painted: the SVG did not render"
    white = counts.get("#FFFFFF", 0) + counts.get("#FAFAFA", 0)
    assert white < 0.97 * WINDOW[0] * WINDOW[1], "the screenshot is almost blank"
