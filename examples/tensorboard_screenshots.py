"""Render a run's TensorBoard pages in headless Chromium and save screenshots.

This is how we check what users see: start TensorBoard on a run directory (for example the
folder printed by ``lightning-cka demo``), load its Time Series (scalars), Images, Custom Scalars
and Text dashboards in a headless browser, and write one PNG per dashboard:

- ``scalars_cka_to_last.png``: the ``cka/self/to_last`` charts (each layer's CKA with the model's
  last layer over training), one card per layer;
- ``images_cka_self.png``: the latest ``cka/self`` heatmap at its actual size;
- ``custom_scalars.png``: the callback's Custom Scalars layout (one chart per family of lines);
- ``text_captions.png``: the captions that explain each image.

Needs the ``chromium`` browser (Debian package ``chromium``) and ``tensorboard``; nothing else
(the browser is driven over its DevTools pipe with the standard library)::

    python examples/tensorboard_screenshots.py runs/version_0 --out docs/img/screenshots --runs vit

The charts are drawn without smoothing and without TensorBoard's "ignore outliers" y-range, which
with the few points of a short run would cut lines off (both are the browser's local settings;
TensorBoard's own defaults apply when you open it yourself).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Shot:
    """One screenshot: a dashboard (URL hash), its query string, the settings it needs and the
    labels of check boxes to click once it is loaded."""

    name: str
    dashboard: str
    #: JavaScript that is true once the dashboard shows its data (helpers in ``DEEP_JS``)
    ready: str
    hash_params: dict[str, str] = field(default_factory=dict)
    query: dict[str, str] = field(default_factory=dict)
    click: tuple[str, ...] = ()
    #: keep only the top of the page (pixels; ``None``: the whole window)
    height: int | None = None


SHOTS = (
    Shot(
        "scalars_cka_to_last",
        "timeseries",
        "visible('scalar-card').length > 0 && deepAll(document, 'scalar-card tb-data-table-content-row').length > 0",
        query={"tagFilter": "cka/self/to_last/", "smoothing": "0"},
    ),
    Shot(
        "images_cka_self",
        "images",
        "visible('img').filter(i => i.complete && i.naturalWidth > 0).length > 0",
        {"tagFilter": "^cka/self$"},
        click=("Show actual image size",),
        height=800,
    ),
    Shot(
        "custom_scalars",
        "custom_scalars",
        "visible('vz-line-chart2').length > 0"
        " && visible('path').filter(p => /L/.test(p.getAttribute('d') || '')).length > 0",
        {"_smoothingWeight": "0"},
    ),
    Shot(
        "text_captions",
        "text",
        "visible('tf-markdown-view').filter(e => e.shadowRoot && e.shadowRoot.textContent.trim()).length > 0",
        {"tagFilter": "^cka/"},
    ),
)

#: Browser-local settings: TensorBoard keeps them in localStorage, not in the URL.
LOCAL_STORAGE = {
    "_tb_global_settings": json.dumps(
        {"ignoreOutliers": False, "scalarSmoothing": 0, "timeSeriesSettingsPaneOpened": False}
    ),
    "_ignoreYOutliers": "false",
}

#: JavaScript helpers: search through shadow roots (TensorBoard's dashboards are web components).
DEEP_JS = """
function deepAll(root, selector, out) {
  out = out || [];
  root.querySelectorAll(selector).forEach(e => out.push(e));
  root.querySelectorAll('*').forEach(e => { if (e.shadowRoot) deepAll(e.shadowRoot, selector, out); });
  return out;
}
function visible(selector) {
  return deepAll(document, selector).filter(e => {
    const box = e.getBoundingClientRect();
    return box.width > 0 && box.height > 0;
  });
}
function visibleSpinners() {
  return visible('paper-spinner, paper-spinner-lite, mat-spinner, mat-progress-spinner')
    .filter(e => e.active !== false).length;
}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(base: str, timeout_s: float = 60.0) -> list[str]:
    """Wait until TensorBoard answers and has read the runs' scalars; returns the run names."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + "data/plugin/scalars/tags", timeout=5) as reply:
                runs = json.loads(reply.read())
            if runs:
                return sorted(runs)
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"TensorBoard at {base} showed no scalars within {timeout_s:.0f} s")


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("No headless browser found: install Debian's `chromium` package.")


class DevTools:
    """Headless Chromium driven over ``--remote-debugging-pipe`` (fd 3: commands in, fd 4: replies
    out, JSON messages ended by a NUL byte)."""

    def __init__(self, chrome: str, width: int, height: int) -> None:
        cmd_r, self._cmd_w = os.pipe()
        self._resp_r, resp_w = os.pipe()
        # copies above fd 4, so that the child can dup2 them onto 3 and 4 without clobbering
        high_cmd_r, high_resp_w = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (cmd_r, resp_w))

        def child_fds() -> None:
            os.dup2(high_cmd_r, 3)
            os.dup2(high_resp_w, 4)

        self.proc = subprocess.Popen(
            [
                chrome,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--mute-audio",
                "--no-first-run",
                f"--window-size={width},{height}",
                "--remote-debugging-pipe",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,  # keeps 3 and 4 (every other descriptor here is close-on-exec)
            preexec_fn=child_fds,  # only dup2, right before exec
        )
        for fd in (cmd_r, resp_w, high_cmd_r, high_resp_w):
            os.close(fd)
        self._buffer = b""
        self._next_id = 0
        self.inflight: set[str] = set()
        self.last_network = time.monotonic()

    def _read_message(self, timeout_s: float) -> dict[str, Any] | None:
        import select

        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._resp_r], [], [], timeout_s)
            if not ready:
                return None
            chunk = os.read(self._resp_r, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        message = json.loads(raw)
        self._event(message)
        return message

    def _event(self, message: dict[str, Any]) -> None:
        method = message.get("method", "")
        params = message.get("params", {})
        if method == "Network.requestWillBeSent":
            self.inflight.add(params["requestId"])
            self.last_network = time.monotonic()
        elif method in ("Network.loadingFinished", "Network.loadingFailed"):
            self.inflight.discard(params["requestId"])
            self.last_network = time.monotonic()

    def send(self, method: str, session: str | None = None, timeout_s: float = 60.0, **params: Any) -> dict:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            reply = self._read_message(max(0.05, deadline - time.monotonic()))
            if reply is not None and reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
        raise TimeoutError(f"no reply to {method} within {timeout_s:.0f} s")

    def pump(self, seconds: float) -> None:
        """Read events for ``seconds`` (keeps the network bookkeeping current)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read_message(max(0.01, deadline - time.monotonic()))

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            self.send("Browser.close", timeout_s=10)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)
        for fd in (self._cmd_w, self._resp_r):
            os.close(fd)


class Page:
    """One browser tab."""

    def __init__(self, tools: DevTools, width: int, height: int) -> None:
        self.tools = tools
        target = tools.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = tools.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params: Any) -> dict:
        return self.tools.send(method, self.session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=DEEP_JS + expression, returnByValue=True)
        return result.get("result", {}).get("value")

    def settle(self, timeout_s: float, ready: str = "true", quiet_s: float = 1.5, silent_s: float = 5.0) -> str:
        """Wait until the network has been quiet (nothing in flight for ``quiet_s``, or no traffic
        at all for ``silent_s``: a few requests never report their end), ``ready`` is true and no
        loading spinner shows. Returns ``""``, or what was still missing at the timeout."""
        deadline = time.monotonic() + timeout_s
        self.tools.pump(1.0)
        missing = "a quiet network"
        while time.monotonic() < deadline:
            self.tools.pump(0.5)
            idle = time.monotonic() - self.tools.last_network
            if (not self.tools.inflight and idle > quiet_s) or idle > silent_s:
                spinners = int(self.evaluate("visibleSpinners()") or 0)
                shown = bool(
                    self.evaluate(f"(() => {{ try {{ return !!({ready}); }} catch (e) {{ return false; }} }})()")
                )
                missing = ", ".join(
                    (["the dashboard's data"] if not shown else [])
                    + ([f"{spinners} loading spinner(s) to finish"] if spinners else [])
                )
                if not missing:
                    self.tools.pump(1.0)  # let charts finish drawing
                    return ""
        return missing

    def goto(self, url: str, timeout_s: float, ready: str = "true") -> str:
        self.tools.inflight.clear()
        self.call("Page.navigate", url=url)
        return self.settle(timeout_s, ready)

    def click_label(self, label: str) -> bool:
        script = (
            "(() => { const hits = deepAll(document, 'paper-checkbox, mat-checkbox, label, button')"
            f".filter(e => e.textContent.trim() === {json.dumps(label)});"
            " if (hits.length) { hits[0].click(); return true; } return false; })()"
        )
        return bool(self.evaluate(script))

    def screenshot(self, path: Path, width: int, height: int) -> None:
        clip = {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}
        data = self.call("Page.captureScreenshot", format="png", clip=clip)["data"]
        path.write_bytes(base64.b64decode(data))


def shot_url(base: str, shot: Shot, runs: str | None) -> str:
    hash_params = dict(shot.hash_params)
    query = dict(shot.query)
    if runs:
        hash_params["regexInput"] = runs  # the legacy dashboards' run filter
        query["runFilter"] = runs  # the Time Series dashboard's
    url = base + ("?" + urllib.parse.urlencode(query) if query else "")
    fragment = shot.dashboard + "".join(f"&{k}={urllib.parse.quote(v, safe='')}" for k, v in hash_params.items())
    return f"{url}#{fragment}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="run directory with TensorBoard event files")
    parser.add_argument("--out", type=Path, default=Path("tensorboard_screenshots"), help="folder for the PNGs")
    parser.add_argument("--runs", default=None, help="regex of the runs to show (e.g. 'vit'; default: all)")
    parser.add_argument("--only", nargs="*", choices=[s.name for s in SHOTS], help="take only these screenshots")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for each page to load")
    args = parser.parse_args(argv)
    if not args.logdir.is_dir():
        parser.error(f"{args.logdir} is not a directory")
    args.out.mkdir(parents=True, exist_ok=True)
    chrome = browser()
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tensorboard.main",
            "--logdir",
            str(args.logdir),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tools = None
    problems = 0
    try:
        base = f"http://127.0.0.1:{port}/"
        runs = wait_for(base, args.timeout)
        print(f"TensorBoard on {args.logdir}: runs {', '.join(runs)}")
        tools = DevTools(chrome, args.width, args.height)
        page = Page(tools, args.width, args.height)
        page.goto(base, args.timeout)
        for key, value in LOCAL_STORAGE.items():
            page.evaluate(f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
        for shot in SHOTS:
            if args.only and shot.name not in args.only:
                continue
            page.call("Page.navigate", url="about:blank")  # a fresh load for every dashboard
            missing = page.goto(shot_url(base, shot, args.runs), args.timeout, shot.ready)
            for label in shot.click:
                if not page.click_label(label):
                    print(f"  note: no check box {label!r} on {shot.dashboard}")
                missing = page.settle(args.timeout, shot.ready)
            path = args.out / f"{shot.name}.png"
            page.screenshot(path, args.width, min(shot.height or args.height, args.height))
            note = f"  (still waiting for {missing} after {args.timeout:.0f} s)" if missing else ""
            problems += bool(missing)
            print(f"wrote {path} ({path.stat().st_size // 1024} KB){note}")
    finally:
        if tools is not None:
            tools.close()
        server.terminate()
        server.wait(timeout=30)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
