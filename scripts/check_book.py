#!/usr/bin/env python
"""Open a built HTML book in headless Chromium and check it as a reader sees it.

    check_book.py _build/html [--screenshot front.png]

Serves the folder on 127.0.0.1, drives Debian's Chromium (``/usr/bin/chromium``) over the
DevTools protocol and, for every HTML page of the book, checks that it loads, that every
image has loaded and decoded (``naturalWidth > 0``), and that every internal link points to
a file of the book and, when it has one, to an anchor that exists on the target page. A
screenshot of the front page is saved if asked. Exits 1 and lists the problems otherwise.

Nothing outside the machine is contacted (Chromium runs with its background networking
off); pages that ask for a CDN script (MathJax) just do without it.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import http.server
import json
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                  "--disable-extensions", "--remote-allow-origins=*", "--remote-debugging-port=0")
#: A page that only redirects (``<meta http-equiv="refresh" content="0; url=...">``).
REFRESH = re.compile(r'<meta[^>]*http-equiv="refresh"[^>]*content="[^"]*url=([^"]+)"', re.I)
#: What every page is asked once it has loaded (all images given time to finish).
PAGE_REPORT_JS = """
(async () => {
  for (const img of document.images) { img.loading = 'eager'; }
  await Promise.all(Array.from(document.images).map(img => img.complete ? null :
      new Promise(done => { img.addEventListener('load', done); img.addEventListener('error', done);
                            setTimeout(done, 10000); })));
  return {
    title: document.title,
    images: Array.from(document.images).map(i => ({src: i.currentSrc || i.src,
                                                   ok: i.complete && i.naturalWidth > 0})),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    ids: Array.from(document.querySelectorAll('[id]')).map(e => e.id)
        .concat(Array.from(document.querySelectorAll('a[name]')).map(a => a.name)),
  };
})()
"""


@dataclass
class PageReport:
    path: str
    title: str = ""
    images: int = 0
    links: int = 0


@dataclass
class BookReport:
    pages: list[PageReport] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    screenshot: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


class _DevTools:
    """The smallest DevTools-protocol client that does the job (tornado's websocket)."""

    def __init__(self, ws, timeout: float):
        self.ws, self.timeout, self.next_id, self.pending = ws, timeout, 0, []

    async def _read(self) -> dict:
        raw = await asyncio.wait_for(self.ws.read_message(), self.timeout)
        if raw is None:
            raise ConnectionError("Chromium closed the DevTools connection")
        return json.loads(raw)

    async def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        await self.ws.write_message(json.dumps(message))
        while True:
            data = await self._read()
            if data.get("id") == self.next_id:
                if "error" in data:
                    raise RuntimeError(f"{method}: {data['error'].get('message')}")
                return data.get("result", {})
            self.pending.append(data)

    async def event(self, method: str, session: str | None = None) -> dict:
        for i, data in enumerate(self.pending):
            if data.get("method") == method and data.get("sessionId") == session:
                return self.pending.pop(i)
        while True:
            data = await self._read()
            if data.get("method") == method and data.get("sessionId") == session:
                return data
            self.pending.append(data)


def _start_chromium(profile_dir: Path, chromium: str, timeout: float) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    port_file = profile_dir / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if port_file.is_file():
            lines = port_file.read_text().split()
            if len(lines) >= 2:
                return proc, f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        if proc.poll() is not None:
            raise RuntimeError(f"{chromium} exited with {proc.returncode} before opening DevTools")
        time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"{chromium} did not open DevTools within {timeout:.0f} s")


def _page_paths(html_dir: Path) -> list[str]:
    """Every HTML page of the book, relative to its folder (theme and source copies excluded)."""
    return sorted(str(p.relative_to(html_dir)) for p in html_dir.rglob("*.html")
                  if not p.relative_to(html_dir).parts[0].startswith(("_static", "_sources", "_images")))


async def _check(html_dir: Path, base: str, ws_url: str, screenshot: Path | None, timeout: float,
                 report: BookReport) -> None:
    from tornado.websocket import websocket_connect

    ws = await websocket_connect(ws_url, max_message_size=256 * 1024 * 1024)
    cdp = _DevTools(ws, timeout)
    target = (await cdp.call("Target.createTarget", url="about:blank"))["targetId"]
    session = (await cdp.call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
    await cdp.call("Page.enable", session)
    await cdp.call("Emulation.setDeviceMetricsOverride", session, width=1280, height=900,
                   deviceScaleFactor=1, mobile=False)
    ids: dict[str, set[str]] = {}
    links: list[tuple[str, str]] = []
    for rel in _page_paths(html_dir):
        url = f"{base}/{rel}"
        redirect = REFRESH.search((html_dir / rel).read_text(errors="replace"))
        if redirect:  # a redirect stub (Jupyter Book's top index.html): its target must exist
            links.append((rel, urljoin(url, redirect.group(1).strip())))
            report.pages.append(PageReport(rel, f"redirect to {redirect.group(1).strip()}"))
            continue
        cdp.pending = [e for e in cdp.pending if e.get("method") != "Page.loadEventFired"]
        nav = await cdp.call("Page.navigate", session, url=url)
        if nav.get("errorText"):
            report.problems.append(f"{rel}: did not load ({nav['errorText']})")
            continue
        await cdp.event("Page.loadEventFired", session)
        result = await cdp.call("Runtime.evaluate", session, expression=PAGE_REPORT_JS, awaitPromise=True,
                                returnByValue=True, timeout=int(timeout * 1000))
        if "exceptionDetails" in result:
            report.problems.append(f"{rel}: page script failed: {result['exceptionDetails'].get('text')}")
            continue
        page = result["result"]["value"]
        if not page["title"] or page["title"].startswith("Error response"):
            report.problems.append(f"{rel}: no title (did it load?)")
        for img in page["images"]:
            if not img["ok"]:
                report.problems.append(f"{rel}: image did not load: {img['src']}")
        ids[rel] = set(page["ids"])
        links += [(rel, href) for href in page["links"]]
        report.pages.append(PageReport(rel, page["title"], len(page["images"]), len(page["links"])))
    # internal links: the file exists, and the anchor on it
    for rel, href in links:
        if not href.startswith(base + "/"):
            continue  # external, mailto:, javascript: — not ours to check
        target_url, fragment = urldefrag(href)
        target_rel = unquote(urlparse(target_url).path).lstrip("/")
        target_path = html_dir / target_rel
        if target_path.is_dir():
            target_path, target_rel = target_path / "index.html", f"{target_rel.rstrip('/')}/index.html".lstrip("/")
        if not target_path.is_file():
            report.problems.append(f"{rel}: broken link {href}")
        elif fragment and target_rel in ids and unquote(fragment) not in ids[target_rel]:
            report.problems.append(f"{rel}: link to a missing anchor {href}")
    if screenshot is not None:
        front = "book/index.html" if (html_dir / "book" / "index.html").is_file() else "index.html"
        await cdp.call("Page.navigate", session, url=f"{base}/{front}")
        await cdp.event("Page.loadEventFired", session)
        await cdp.call("Runtime.evaluate", session, expression=PAGE_REPORT_JS, awaitPromise=True, returnByValue=True)
        shot = await cdp.call("Page.captureScreenshot", session, format="png")
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        report.screenshot = screenshot
    ws.close()


def check_book(html_dir: Path, screenshot: Path | None = None, chromium: str = CHROMIUM,
               timeout: float = 60.0) -> BookReport:
    """Check every page of the book in ``html_dir`` in headless Chromium (see the module doc)."""
    html_dir = Path(html_dir).resolve()
    if not (html_dir / "index.html").is_file():
        raise FileNotFoundError(f"{html_dir} holds no built book (index.html missing)")
    if shutil.which(chromium) is None:
        raise FileNotFoundError(f"{chromium} not found: install Debian's chromium (`make setup` does, as root)")
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(html_dir)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    report = BookReport()
    with tempfile.TemporaryDirectory(prefix="sdsscl-chromium-") as profile_dir:
        proc, ws_url = _start_chromium(Path(profile_dir), chromium, timeout)
        try:
            asyncio.run(_check(html_dir, base, ws_url, screenshot, timeout, report))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            server.shutdown()
            server.server_close()
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("html_dir", type=Path, help="the built book, e.g. _build/html")
    parser.add_argument("--screenshot", type=Path, help="save a PNG of the front page here")
    parser.add_argument("--chromium", default=CHROMIUM)
    args = parser.parse_args(argv)
    report = check_book(args.html_dir, args.screenshot, args.chromium)
    for page in report.pages:
        print(f"ok  {page.path:<45} {page.images:3d} images {page.links:4d} links  {page.title}")
    if report.screenshot:
        print(f"front page screenshot: {report.screenshot}")
    if not report.ok:
        print("\n".join(["", "PROBLEMS:"] + report.problems))
        raise SystemExit(1)
    print(f"{len(report.pages)} pages checked: every page loads, every image and internal link resolves")


if __name__ == "__main__":
    main()
