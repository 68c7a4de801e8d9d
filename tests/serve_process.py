"""`tokenforge serve` as a real subprocess (its own process group, output in a file) on a free
loopback port: for tests that kill, signal or restart the server."""

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

TOKENFORGE = Path(sys.executable).with_name("tokenforge")
START_TIMEOUT_S = 120


@dataclass
class ServeProcess:
    process: subprocess.Popen
    base_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.process.wait(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_serve(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ServeProcess:
    """Starts `tokenforge serve ARGS` (CPU, fp32, a small KV cache) and returns once /health is 200."""
    port = free_port()
    full_env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1", **(env or {})}
    command = [str(TOKENFORGE), "serve", "--port", str(port), "--kv-cache-memory", "256MiB", "--device", "cpu",
               "--dtype", "float32", *args]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    serve = ServeProcess(process, f"http://127.0.0.1:{port}", log_path)
    if wait_healthy(serve.base_url, START_TIMEOUT_S, lambda: process.poll() is None):
        return serve
    serve.kill()
    raise RuntimeError(f"tokenforge serve did not become healthy:\n{serve.log()[-3000:]}")


def wait_healthy(base_url: str, timeout_s: float, is_alive: Callable[[], bool] = lambda: True) -> bool:
    """True once GET /health answers 200; False after `timeout_s` or once `is_alive()` turns false."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and is_alive():
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    return False
