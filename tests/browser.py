"""Pages as a person sees them: Debian's headless Chromium loads each URL in a fresh profile (a first visit: no
choice remembered from an earlier page), runs its scripts, and hands back the DOM they built."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path

import pytest

# Virtual time: Chromium fast-forwards timers and pauses the clock while a request is pending, so the pages' data
# has arrived when the budget runs out, on a slow machine too; the wall time is mostly Chromium's start.
BUDGET_MS = 5_000


def chromium() -> str:
    """The browser's path; skips the test where there is none (`make test` installs it: .ci/chromium)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no `chromium` on PATH: `make test` installs Debian's package (.ci/chromium) where apt-get can")
    return path


def render(browser: str, urls: list[str], tmp: Path, timeout_s: float = 120) -> list[str]:
    """Each URL's DOM after its scripts ran, in the order given; the browsers run side by side."""
    procs = [
        subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",  # as root (CI, containers) Chromium refuses to start sandboxed
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                f"--user-data-dir={tmp / f'chromium-{i}'}",
                f"--virtual-time-budget={BUDGET_MS}",
                "--dump-dom",
                url,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, url in enumerate(urls)
    ]
    doms = []
    for url, p in zip(urls, procs):
        out, err = p.communicate(timeout=timeout_s)
        assert p.returncode == 0 and out, f"chromium could not render {url} (exit {p.returncode}): {err[-2000:]}"
        doms.append(out)
    return doms


def title(dom: str) -> str:
    m = re.search(r"<title>(.*?)</title>", dom, re.S)
    return html.unescape(m.group(1)).strip() if m else ""


def text(dom: str) -> str:
    """The page's visible text, one `|` between elements (so a table row reads `a|b|c`)."""
    body = re.sub(r"<(script|style|title)\b[^>]*>.*?</\1>", "", dom, flags=re.S)
    return re.sub(r"\|(\s*\|)+", "|", html.unescape(re.sub(r"<[^>]+>", "|", body)))


def links(dom: str) -> list[str]:
    """The page's http(s) links, in order, once each."""
    return list(dict.fromkeys(html.unescape(h) for h in re.findall(r'href="(https?://[^"]+)"', dom)))
