"""Debian's headless `chromium` driven over the DevTools protocol: open a page, collect console errors,
measure elements, take a full-page screenshot. Used by the report tests and scripts/make_screenshots.py.

The browser gets a fresh profile directory, no network features, and picks its own debugging port (read
from DevToolsActivePort), so parallel tests never collide. A missing binary fails with the install command.
"""

from __future__ import annotations

import base64
import contextlib
import json
import pathlib
import shutil
import subprocess
import tempfile
import time
from typing import Any

import websocket

from wait_support import wait_until

START_TIMEOUT_S = 30.0
LOAD_TIMEOUT_S = 30.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
    "--remote-allow-origins=*",
)


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    raise RuntimeError("chromium is not installed: run scripts/install-dev.sh (apt-get install chromium)")


class Page:
    """One browser tab: `open(url)`, then `errors`, `evaluate()`, `screenshot()`."""

    def __init__(self, browser: Browser, session: str) -> None:
        self._browser = browser
        self._session = session
        #: Console errors, uncaught exceptions and failed loads seen since the page was opened.
        self.errors: list[str] = []

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        return self._browser.call(method, params, session=self._session, sink=self._event)

    def open(self, url: str, *, width: int = 1300, height: int = 900) -> None:
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        self._loaded = False
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not self._loaded:
            assert time.monotonic() < deadline, f"{url} did not load in {LOAD_TIMEOUT_S}s"
            self._browser.pump(self._session, self._event, timeout=deadline - time.monotonic())

    def evaluate(self, expression: str) -> Any:
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in reply:
            raise RuntimeError(f"{expression!r} raised: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def wait_for(self, expression: str, timeout: float = LOAD_TIMEOUT_S) -> Any:
        """Evaluate `expression` until it is truthy, handling the page's events meanwhile (navigations, redirects
        and refreshes in progress); returns its value."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # the document is being replaced
                value = None
            if value:
                return value
            assert time.monotonic() < deadline, f"{expression!r} still false after {timeout}s"
            with contextlib.suppress(websocket.WebSocketTimeoutException):  # no event in 0.1 s: evaluate again
                self._browser.pump(self._session, self._event, timeout=0.1)

    def cookies(self) -> list[dict[str, Any]]:
        """The browser's cookies for the page's URL, with their attributes (HttpOnly ones included)."""
        return list(self.send("Network.getCookies")["cookies"])

    def screenshot(self) -> bytes:
        """A PNG of the whole page (beyond the viewport)."""
        reply = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        return base64.b64decode(reply["data"])

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Page.loadEventFired":
            self._loaded = True
        elif method == "Runtime.exceptionThrown":
            self.errors.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            self.errors.append(
                "console: " + " ".join(str(a.get("value", a.get("description"))) for a in params["args"])
            )
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            self.errors.append(f"log: {params['entry'].get('text')} {params['entry'].get('url', '')}".strip())
        elif method == "Network.loadingFailed":
            self.errors.append(f"load failed: {params.get('errorText')}")


class Browser:
    """A headless chromium process and one DevTools websocket; a context manager."""

    def __init__(self) -> None:
        self._profile = tempfile.mkdtemp(prefix="gradwatch-chromium-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._ws: websocket.WebSocket | None = None
        self._next_id = 0

    def __enter__(self) -> Browser:
        binary = find_chromium()
        log = pathlib.Path(self._profile) / "chromium.log"
        with log.open("wb") as out:
            self._proc = subprocess.Popen(
                [binary, *FLAGS, f"--user-data-dir={self._profile}", "about:blank"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        port_file = pathlib.Path(self._profile) / "DevToolsActivePort"
        proc = self._proc

        def started() -> bool:
            if port_file.exists() and len(port_file.read_text().splitlines()) >= 2:
                return True
            if proc.poll() is not None:
                raise RuntimeError(f"chromium exited:\n{log.read_text()[-3000:]}")
            return False

        wait_until(started, START_TIMEOUT_S, what="chromium to start", interval=0.05,
                   detail=lambda: log.read_text()[-3000:])  # fmt: skip
        port, path = port_file.read_text().splitlines()[:2]
        self._ws = websocket.create_connection(
            f"ws://127.0.0.1:{port}{path}", timeout=LOAD_TIMEOUT_S, suppress_origin=True
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._ws is not None:
            self._ws.close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
        shutil.rmtree(self._profile, ignore_errors=True)

    def new_page(self) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return Page(self, session)

    def call(self, method: str, params: dict[str, Any], *, session: str | None = None, sink: Any = None) -> Any:
        assert self._ws is not None
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        self._ws.send(json.dumps(message))
        while True:
            reply = json.loads(self._ws.recv())
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if sink is not None and "method" in reply and reply.get("sessionId") == session:
                sink(reply["method"], reply.get("params", {}))

    def pump(self, session: str, sink: Any, timeout: float) -> None:
        """Deliver the next event of `session` to `sink` (waiting up to `timeout` seconds)."""
        assert self._ws is not None
        self._ws.settimeout(max(0.1, timeout))
        try:
            reply = json.loads(self._ws.recv())
        finally:
            self._ws.settimeout(LOAD_TIMEOUT_S)
        if "method" in reply and reply.get("sessionId") == session:
            sink(reply["method"], reply.get("params", {}))
