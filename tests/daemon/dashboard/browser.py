"""Headless Chromium for the dashboard's browser tests, driven by Selenium through Debian's
chromedriver; each test skips, saying what is missing, where Chromium, chromedriver or
Selenium (or axe-core, for the accessibility check) is not installed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")
# axe.min.js: $GRIDMESH_AXE_JS, or the one pinned beside this file (package.json here:
# `npm ci` in tests/daemon/dashboard)
AXE_ENV = "GRIDMESH_AXE_JS"
AXE_PINNED = Path(__file__).resolve().parent / "node_modules" / "axe-core" / "axe.min.js"
# the closed network refuses Chromium's own connections: turn them all off
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,2000",  # tall: a screenshot shows a whole view
)


def find_chromium() -> tuple[str, str]:
    """(chromium, chromedriver) paths, or skip saying which is missing."""
    browser = os.environ.get("GRIDMESH_CHROMIUM") or next(
        (p for p in map(shutil.which, CHROMIUM_NAMES) if p), None
    )
    driver = os.environ.get("GRIDMESH_CHROMEDRIVER") or shutil.which("chromedriver")
    if not browser or not driver:
        missing = "chromium" if not browser else "chromedriver"
        pytest.skip(
            f"browser tests need {missing}: apt-get install -y chromium chromium-driver "
            "(or set GRIDMESH_CHROMIUM / GRIDMESH_CHROMEDRIVER)"
        )
    return browser, driver


AXE_MISSING = (
    "the accessibility check needs axe-core: `cd tests/daemon/dashboard && npm ci` "
    f"(or set {AXE_ENV} to an axe.min.js)"
)


def axe_source() -> str | None:
    """axe-core's script, or None (the test then skips at its end, saying AXE_MISSING)."""
    given = os.environ.get(AXE_ENV)
    path = Path(given) if given else AXE_PINNED
    return path.read_text(encoding="utf-8") if path.is_file() else None


def start_chromium(profile: Path) -> Any:
    """A headless Chromium with a fresh profile, its console log kept for the test."""
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="browser tests need selenium: pip install selenium"
    )
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingOptions", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The console's errors since the last call (reading the log empties it)."""
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"]


def run_axe(driver: Any, source: str) -> list[dict[str, Any]]:
    """axe-core's violations of the page as it is now: WCAG 2.0 and 2.1 A and AA rules
    (names, labels, contrast, keyboard access), and axe's best practices (landmarks,
    headings, no positive tabindex)."""
    driver.execute_script(source)
    result = driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "axe.run(document, {runOnly: {type: 'tag', values: arguments[0]}})"
        ".then((r) => done(r.violations.map((v) => ({id: v.id, help: v.help,"
        " nodes: v.nodes.map((n) => n.target.join(' '))}))))"
        ".catch((e) => done([{id: 'axe-error', help: String(e), nodes: []}]));",
        AXE_TAGS,
    )
    return result
