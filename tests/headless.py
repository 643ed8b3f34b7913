"""Headless Chromium for page tests: Playwright for Python driving Debian's `/usr/bin/chromium`.

Playwright's own browser builds are never downloaded (nothing may be fetched here): the browser
is launched with `executable_path`. One browser per test module (starting one takes a second or
two; per module, so Playwright's event loop never outlives the module into other tests' asyncio),
a fresh context (cookies, storage, viewport) per test. A test that asks for `chromium_tab`
skips with the reason when Chromium or Playwright is missing (`make test` installs both, and
sets SAEV_REQUIRE_PLAYWRIGHT=1 so a missing Playwright fails instead).

`SAEV_CHROMIUM` names another Chromium executable (default /usr/bin/chromium).

`Tab.errors` collects what a person would see in the DevTools console as a failure: uncaught
exceptions and `console.error` calls; tests assert it is empty at the end.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field

import pytest

CHROMIUM = os.environ.get("SAEV_CHROMIUM", "/usr/bin/chromium")


def chromium() -> str | None:
    """The Chromium executable the tests drive, or None when it is not installed."""
    return CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")


def missing() -> str | None:
    """Why a browser test cannot run here, or None when it can."""
    if chromium() is None:
        return f"no chromium at {CHROMIUM} (make test installs Debian's package)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


@dataclass
class Tab:
    """One Playwright page, with the console errors it has shown so far."""

    page: object  # playwright.sync_api.Page
    errors: list = field(default_factory=list)


@pytest.fixture(scope="module")
def chromium_browser():
    """A headless Chromium for the test module (skips when there is none)."""
    why = missing()
    if why and chromium() is not None and os.environ.get("SAEV_REQUIRE_PLAYWRIGHT") == "1":
        # `make test` installs Playwright with the dev extra: its absence there is a broken
        # set-up, not a reason to skip every page test quietly (a missing Chromium still skips)
        pytest.fail(why)
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # Playwright passes --no-sandbox itself (it runs as root here); headless by default
        browser = pw.chromium.launch(executable_path=chromium())
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def chromium_tab(chromium_browser):
    """A fresh 1280 x 900 page in its own context; closed when the test ends."""
    context = chromium_browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    tab = Tab(page)
    page.on("pageerror", lambda exc: tab.errors.append(f"uncaught: {exc}"))

    def on_console(msg) -> None:
        if msg.type == "error":
            tab.errors.append(f"console.error: {msg.text}")

    page.on("console", on_console)
    try:
        yield tab
    finally:
        context.close()
