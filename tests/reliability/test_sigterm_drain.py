"""SIGTERM drains a real `tokenforge serve`: the streams in flight run to their end, new requests
get 503 shutting_down (with retry-after) meanwhile, then the process exits cleanly."""

import json
import signal
import threading

import httpx

from tests.serve_process import start_serve
from tokenforge.config import DEFAULT_MODEL

BODY = {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": 40,
        "ignore_eos": True, "stream": True}
NUM_STREAMS = 3


def test_sigterm_drains_then_exits(tmp_path):
    serve = start_serve(["--no-control-plane", "--drain-timeout", "60"], tmp_path / "serve.log")
    results: list[list[str]] = [[] for _ in range(NUM_STREAMS)]
    started = threading.Barrier(NUM_STREAMS + 1, timeout=60)

    def stream(index: int) -> None:
        with httpx.stream("POST", f"{serve.base_url}/v1/chat/completions", json=BODY, timeout=120) as response:
            lines = response.iter_lines()
            results[index].append(next(line for line in lines if line.startswith("data: {")))
            started.wait()
            results[index].extend(line for line in lines if line.startswith("data: "))

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(NUM_STREAMS)]
    try:
        for thread in threads:
            thread.start()
        started.wait()
        serve.signal(signal.SIGTERM)
        refused = httpx.post(f"{serve.base_url}/v1/chat/completions", json={**BODY, "stream": False}, timeout=30)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
        assert refused.headers["retry-after"]
        assert httpx.get(f"{serve.base_url}/health", timeout=30).status_code == 503
        for thread in threads:
            thread.join(120)
        assert serve.process.wait(60) == 0, serve.log()[-2000:]
    finally:
        serve.kill()
    for lines in results:
        assert lines[-1] == "data: [DONE]", lines[-3:]
        finish = [json.loads(line[6:])["choices"][0].get("finish_reason") for line in lines[:-1]]
        assert finish[-1] == "length"  # every stream ran to its max_tokens
