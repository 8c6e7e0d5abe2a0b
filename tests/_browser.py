"""A real headless browser for the report tests: Debian's Chromium driven by its own ChromeDriver
through Selenium, with the network off.

Nothing is downloaded at run time: the browser and the driver are the Debian packages `chromium`
and `chromium-driver` (/usr/bin/chromium, /usr/bin/chromedriver), named explicitly so Selenium
Manager never runs. The network is off for the page: every host resolves to nothing and every
proxied request goes to a closed port, so a page that tried to fetch anything would show it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

CHROMIUM = Path(os.environ.get("LORAD_TEST_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("LORAD_TEST_CHROMEDRIVER", "/usr/bin/chromedriver"))

FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
    # The network off: nothing resolves, and anything proxied goes to the discard port.
    "--proxy-server=127.0.0.1:9",
    "--proxy-bypass-list=<-loopback>",
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def missing() -> str | None:
    """Why the browser cannot start here, or None."""
    for exe, pkg in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not exe.exists():
            return f"{exe} is missing (apt-get install {pkg})"
    return None


@contextlib.contextmanager
def chromium(width: int = 1280, height: int = 900) -> Iterator[object]:
    """A Selenium WebDriver for headless Debian Chromium with a fresh profile; quits on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    why = missing()
    if why:
        raise RuntimeError(why)
    profile = tempfile.mkdtemp(prefix="lorad-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors: CSP, fetches
    service = Service(executable_path=str(CHROMEDRIVER))  # a path given: Selenium Manager never runs
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def console_errors(driver: object) -> list[str]:
    """The page's console messages of level SEVERE (a blocked fetch or script shows up here)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def full_page_screenshot(driver: object, path: Path, max_height: int = 8000) -> bytes:
    """Resize the window so the whole page (up to max_height CSS pixels) is in view; save a PNG."""
    for _ in range(3):  # the window's own chrome takes some height: measure it, then fit
        inner = driver.execute_script("return window.innerHeight")
        outer = driver.get_window_size()
        page = driver.execute_script("return Math.ceil(document.documentElement.scrollHeight)")
        want = min(max(int(page), 200), max_height)
        if inner == want:
            break
        driver.set_window_size(outer["width"], outer["height"] + want - inner)
    png = driver.get_screenshot_as_png()
    Path(path).write_bytes(png)
    return png
