"""Headless Chromium driven over the DevTools protocol, and ``pocoflow monitor`` served
on a free port for it: the monitor's end-to-end tests and bench/monitor.py share both.

No dependency to install: Debian's ``chromium`` package is the browser (``make e2e-deps`` installs it; nothing is
downloaded by the tests); the protocol is spoken over a WebSocket with Tornado's client,
which Streamlit already brings. Only what the monitor's tests need: open a URL, wait
until the page's HTML holds some text (waiting on state, not time), take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tornado.websocket import WebSocketClientConnection, websocket_connect

CHROMIUM = Path("/usr/bin/chromium")
_DEVTOOLS = re.compile(r"DevTools listening on ws://[^:]+:(\d+)/")
# Two animation frames after the content arrived: the data grid has painted its canvas.
_PAINTED = "new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))"


class Browser:
    """One headless Chromium process and one page; use as a context manager."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        # In the session's temp dir (what children see as TMPDIR), removed at its end: a
        # helper process of Chromium (crashpad) may still write here after ``close``.
        self._profile = tempfile.mkdtemp(prefix="pocoflow-chromium-", dir=os.environ.get("TMPDIR"))
        self._proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",  # because tests may run as root in a container
                "--disable-gpu",
                "--remote-debugging-port=0",
                f"--user-data-dir={self._profile}",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its renderer and crashpad helpers go with it
        )
        self._loop = asyncio.new_event_loop()
        self._ws: WebSocketClientConnection | None = None
        self._ids = 0
        self._size = (width, height)

    def __enter__(self) -> Browser:
        try:
            port = self._devtools_port()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
                page = next(t for t in json.load(r) if t["type"] == "page")

            async def connect() -> WebSocketClientConnection:
                # Inside the loop: Tornado binds the connection to the running loop.
                url = page["webSocketDebuggerUrl"]
                return await websocket_connect(url, max_message_size=64 << 20)

            self._ws = self._run(connect())
            width, height = self._size
            self.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ws is not None:
            ws, self._ws = self._ws, None

            async def closing() -> None:  # on the browser's own loop: Tornado needs one
                ws.close()

            with contextlib.suppress(Exception):
                self._run(closing())
        self._stop_process_group()
        if self._proc.stderr is not None:
            self._proc.stderr.close()
        self._loop.close()
        shutil.rmtree(self._profile, ignore_errors=True)

    def _stop_process_group(self) -> None:
        """Chromium and every helper it started (they share its session), so none writes
        into the profile once it is removed."""
        group = self._proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        deadline = time.monotonic() + 10
        while True:
            try:
                os.killpg(group, signal.SIGKILL if time.monotonic() > deadline else 0)
            except ProcessLookupError:
                return  # no process of the group is left
            if time.monotonic() > deadline + 5:
                return
            time.sleep(0.05)

    def _devtools_port(self) -> int:
        assert self._proc.stderr is not None
        said: list[str] = []
        for line in self._proc.stderr:
            found = _DEVTOOLS.search(line)
            if found:
                return int(found.group(1))
            said = [*said[-19:], line.rstrip()]
        raise RuntimeError(
            f"{CHROMIUM} exited ({self._proc.wait()}) before DevTools started; its last "
            "words:\n" + "\n".join(said)
        )

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(coro, 30))

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events arriving meanwhile are dropped)."""
        assert self._ws is not None
        self._ids += 1
        ident = self._ids

        async def exchange() -> dict[str, Any]:
            assert self._ws is not None
            await self._ws.write_message(
                json.dumps({"id": ident, "method": method, "params": params})
            )
            while True:
                text = await self._ws.read_message()
                if text is None:
                    raise RuntimeError("Chromium closed the DevTools connection")
                message = json.loads(text)
                if message.get("id") == ident:
                    if "error" in message:
                        raise RuntimeError(f"{method}: {message['error']}")
                    return message.get("result", {})

        return self._run(exchange())

    def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        result = self.call(
            "Runtime.evaluate",
            expression=expression,
            returnByValue=True,
            awaitPromise=await_promise,
        )
        return result.get("result", {}).get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def html(self) -> str:
        return self.evaluate("document.documentElement.outerHTML") or ""

    def wait_for(self, *texts: str, timeout: float = 45.0) -> str:
        """The page's HTML once it holds every one of ``texts``; AssertionError (with the
        page's visible text) if it does not within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            html = self.html()
            if all(t in html for t in texts):
                # Streamlit draws what arrived on the next frames; wait for them to paint.
                self.evaluate(_PAINTED, await_promise=True)
                return html
            if time.monotonic() > deadline:
                visible = self.evaluate("document.body.innerText") or ""
                raise AssertionError(f"page never showed {texts}; it shows:\n{visible[:2000]}")
            time.sleep(0.2)

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def serve_monitor(
    db_url: str, timeout: float = 60.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``pocoflow monitor --db DB_URL`` on a free port: ``(base URL, process)`` once it
    answers its health check; stopped on the way out."""
    env = {**os.environ, "STREAMLIT_BROWSER_GATHER_USAGE_STATS": "false"}
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pocoflow.cli", "monitor", "--db", db_url, "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not _healthy(url):
            if proc.poll() is not None:
                raise RuntimeError(f"pocoflow monitor exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pocoflow monitor did not answer on {url} in {timeout}s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
