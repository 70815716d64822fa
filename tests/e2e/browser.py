"""Helpers to drive Debian's chromium with the PyPI playwright package against a local server."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOGS = ROOT / "artifacts" / "logs"
CHROMIUM = "/usr/lib/chromium/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def served_app(
    app_dir: Path = ROOT, env: dict[str, str] | None = None, port: int | None = None, name: str = "streamlit"
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`streamlit run app.py` in `app_dir` on a free loopback port; yields (base URL, the server
    process) once healthy, and stops it after. Its output goes to artifacts/logs/<name>-<port>.log."""
    port = port or free_port()
    command = [sys.executable, "-m", "streamlit", "run", "app.py", "--server.address", "127.0.0.1"]
    command += ["--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    process_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    # The server's output goes to a file: an unread pipe fills up and blocks the server.
    LOGS.mkdir(parents=True, exist_ok=True)
    log_path = LOGS / f"{name}-{port}.log"
    log = log_path.open("w")
    process = subprocess.Popen(command, cwd=app_dir, env=process_env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"streamlit exited: {log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).read() == b"ok":
                    break
            time.sleep(0.5)
        else:
            raise RuntimeError(f"streamlit did not become healthy within 120 s; see {log_path}")
        yield url, process
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextlib.contextmanager
def streamlit_server(port: int | None = None, env: dict[str, str] | None = None) -> Iterator[str]:
    """The app of this checkout served on a free loopback port; yields the base URL once healthy."""
    with served_app(env=env, port=port) as (url, _):
        yield url


def wait_idle(page, timeout_ms: int = 60_000) -> None:
    """Wait until the Streamlit script has finished running."""
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout_ms)
    page.wait_for_timeout(300)
