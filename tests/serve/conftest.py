"""Starting `chatrlhf serve` as a user does: the real command in a subprocess, on a free port it picks itself
(`--port 0`; the address is read from the line it prints), waited for on /health."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]


def env() -> dict:
    """The test's environment for a subprocess, with this checkout first on the path."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@dataclass
class Server:
    proc: subprocess.Popen
    url: str = ""
    """http://host:port (without /v1)."""
    lines: list[str] = field(default_factory=list)
    """Everything it printed (stdout and stderr), as it prints it."""

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(*args: str, timeout: float = 300) -> Server:
    """`python -m chatrlhf serve ARGS --port 0`, running and healthy."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chatrlhf", "serve", *args, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=env(),
        cwd=ROOT,
    )
    server = Server(proc)
    found = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            server.lines.append(line)
            m = re.search(r" at (http://\S+)/v1", line)
            if m and not server.url:
                server.url = m.group(1)
                found.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + timeout
    while not found.wait(0.2):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"chatrlhf serve did not start (exit {proc.returncode}):\n{server.output()}")
    while True:
        try:
            if httpx.get(server.url + "/health", timeout=5).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"chatrlhf serve never became healthy:\n{server.output()}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def random_llama(tmp_path_factory):
    """A tiny random llama (hidden 64, heads of 32): greedy decoding repeats one character and never stops, which
    makes long, predictable replies."""
    from chatrlhf.models.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("random") / "llama", arch="llama", hidden=64, layers=2, heads=2)
