"""Peak RSS of `tokenforge serve` with its default KV budget, under a burst of concurrent requests.

Starts the real server as a subprocess on a free loopback port, waits for /health, sends
--num-requests concurrent chat requests, then reads the server's VmHWM (peak RSS) from /proc.
"""

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from throughput import git_info, machine_info, write_result  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in bytes."""
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+) kB", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


async def burst(base: str, num_requests: int, max_tokens: int) -> int:
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i: int) -> int:
            body = {"model": "smollm2-135m-instruct", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Request {i}: describe a city you like."}]}
            r = await client.post(f"{base}/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        return sum(await asyncio.gather(*(one(i) for i in range(num_requests))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tokenforge.cli.main", "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise SystemExit("server did not become healthy")
        after_load = proc_status(server.pid)
        num_tokens = asyncio.run(burst(base, args.num_requests, args.max_tokens))
        after_burst = proc_status(server.pid)
    finally:
        server.terminate()
        log = server.communicate(timeout=30)[0]
    kv_line = next((line for line in log.splitlines() if "KV cache:" in line), "")
    result = {
        "machine": machine_info(), "git": git_info(),
        "config": {"command": "tokenforge serve (defaults)", "num_requests": args.num_requests,
                   "max_tokens": args.max_tokens},
        "kv_cache_log_line": kv_line.strip(),
        "rss_after_load_mib": round(after_load["VmRSS"] / 2**20, 1),
        "peak_rss_mib": round(after_burst["VmHWM"] / 2**20, 1),
        "completion_tokens": num_tokens,
    }
    print(json.dumps(result, indent=2))
    print(f"wrote {write_result('memory', result)}", file=sys.stderr)


if __name__ == "__main__":
    main()
