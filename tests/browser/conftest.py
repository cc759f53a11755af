"""Real headless Chromium (Debian's package) driven by Playwright, against real appliance processes.

The browser is never downloaded: ``executable_path`` is the system's ``chromium`` (installed by the
test bootstrap from tools/apt/browser.txt). Screenshots are saved as artifacts in
``WSBRIDGE_SCREENSHOT_DIR`` (default: a fresh temporary directory, printed at the end).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")

SCREENSHOTS = Path(os.environ.get("WSBRIDGE_SCREENSHOT_DIR") or tempfile.mkdtemp(prefix="wsb-screenshots-"))


@pytest.fixture(scope="module")
def chromium() -> Iterator:
    """One browser per test module: Playwright's sync API holds an event loop on this thread while it
    runs, so it must stop before the asyncio tests of later folders (pytest-asyncio) start."""
    executable = shutil.which("chromium")
    if executable is None:
        raise RuntimeError("chromium not found: run the tests through `python3 dev.py test` (tools/apt/browser.txt)")
    with playwright_api.sync_playwright() as playwright:
        # --no-sandbox: the tests may run as root (CI), where Chromium refuses its sandbox.
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()
    print(f"\nDashboard screenshots: {SCREENSHOTS}")


class Console:
    """Everything the page reported: console errors (CSP violations land here), page errors, dialogs."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.dialogs: list[str] = []

    def assert_clean(self, *expected_statuses: int) -> None:
        """``expected_statuses``: error answers the test provoked (Chromium logs each as "Failed to load")."""
        expected = tuple(f"the server responded with a status of {status} " for status in expected_statuses)
        self.errors = [
            e for e in self.errors if not (e.startswith("Failed to load resource") and any(x in e for x in expected))
        ]
        assert not self.dialogs, f"a dialog opened (script ran): {self.dialogs}"
        violations = [e for e in self.errors if "Content Security Policy" in e or "Refused to" in e]
        assert not violations, f"CSP violations: {violations}"
        assert not self.errors, f"console errors: {self.errors}"


@pytest.fixture
def context(chromium) -> Iterator:
    context = chromium.new_context(viewport={"width": 1280, "height": 800})
    yield context
    context.close()


@pytest.fixture
def console() -> Console:
    return Console()


@pytest.fixture
def new_page(context, console):
    """Another tab in the same browser context (same cookies), watched like ``page``."""

    def open_tab():
        tab = context.new_page()
        watch(tab, console)
        return tab

    return open_tab


@pytest.fixture
def page(new_page):
    return new_page()


@pytest.fixture
def page_with(chromium, console) -> Iterator:
    """``page_with(**options)``: a watched page in a context of its own (a time zone, a color scheme...)."""
    contexts = []

    def open_page(**options):
        context = chromium.new_context(**{"viewport": {"width": 1280, "height": 800}, **options})
        contexts.append(context)
        tab = context.new_page()
        watch(tab, console)
        return tab

    yield open_page
    for context in contexts:
        context.close()


def watch(page, console: Console) -> None:
    def on_console(message) -> None:
        if message.type == "error":
            console.errors.append(message.text)

    def on_dialog(dialog) -> None:
        if dialog.type == "confirm":  # hx-confirm: the tests accept what they asked for.
            dialog.accept()
            return
        console.dialogs.append(f"{dialog.type}: {dialog.message}")
        dialog.dismiss()

    page.on("console", on_console)
    page.on("pageerror", lambda error: console.errors.append(f"page error: {error}"))
    page.on("dialog", on_dialog)


@pytest.fixture
def screenshot():
    """``screenshot(page, name)`` saves a full-page PNG as a test artifact and returns its path."""

    def save(page, name: str) -> Path:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        path = SCREENSHOTS / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return save
