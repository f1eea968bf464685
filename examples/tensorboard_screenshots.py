"""Render a run's TensorBoard pages in headless Chromium and save screenshots.

This is how we check what users see: start TensorBoard on a run directory (for example the
folder printed by ``lightning-cka demo``), load its Images, Scalars, Custom Scalars and Text
dashboards in a headless browser, and write one PNG per dashboard.

Needs the ``chromium`` browser (Debian package ``chromium``) and ``tensorboard``::

    python examples/tensorboard_screenshots.py runs/demo/version_0 --out docs/img/tensorboard
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

DASHBOARDS = {"images": "images", "custom_scalars": "custom_scalars", "scalars": "timeseries", "text": "text"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"TensorBoard did not answer at {url} within {timeout_s:.0f} s")


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("No headless browser found: install Debian's `chromium` package.")


def screenshot(chrome: str, url: str, path: Path, size: tuple[int, int] = (1600, 1200)) -> None:
    subprocess.run(
        [
            chrome,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size[0]},{size[1]}",
            "--virtual-time-budget=15000",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=120,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir", type=Path, help="run directory with TensorBoard event files")
    parser.add_argument("--out", type=Path, default=Path("tensorboard_screenshots"), help="folder for the PNGs")
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
    try:
        base = f"http://127.0.0.1:{port}/"
        wait_for(base)
        for name, plugin in DASHBOARDS.items():
            path = args.out / f"{name}.png"
            screenshot(chrome, f"{base}#{plugin}", path)
            print(f"wrote {path}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
