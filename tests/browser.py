"""The Chromium that the chat page tests drive through Playwright: found on this machine, or installed
by `make test` (`python tests/browser.py`): Debian's package where apt-get is there and we are root,
Playwright's own build otherwise. Where neither can be had, the tests are skipped with `HOW_TO_INSTALL`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

COMMANDS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
HOW_TO_INSTALL = ("no Chromium for the chat page tests: run `sudo apt-get install chromium` (Debian/Ubuntu) or "
                  "`.venv/bin/python -m playwright install chromium`")


def find_chromium() -> str | None:
    """A Chromium on PATH, else the one `playwright install chromium` downloaded, else None."""
    for name in COMMANDS:
        if found := shutil.which(name):
            return found
    try:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            path = p.chromium.executable_path
    except Exception:  # no playwright, or its driver cannot start: nothing to find there
        return None
    return path if Path(path).is_file() else None


def install() -> str | None:
    """Find a Chromium, or install one: apt-get as root, else Playwright's download."""
    if found := find_chromium():
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        print("installing Debian's chromium (apt-get) for the chat page tests", flush=True)
        quiet = {"stdout": subprocess.DEVNULL}
        if subprocess.run(["apt-get", "update", "-qq"], **quiet).returncode == 0:
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], **quiet,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if found := find_chromium():
            return found
    print("installing Playwright's Chromium for the chat page tests", flush=True)
    subprocess.run([sys.executable, "-m", "playwright", "install", "chromium"])
    return find_chromium()


if __name__ == "__main__":
    found = install()
    print(f"chat page tests use {found}" if found else f"{HOW_TO_INSTALL}; they will be skipped")
