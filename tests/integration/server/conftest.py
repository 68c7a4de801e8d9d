"""A real server on a free loopback port: uvicorn in a thread of the test process, over the shared
SmolLM2 weights. One for the whole session; tests that break or fill their engine make their own."""

import socket
import threading
import time
from dataclasses import dataclass

import httpx
import openai
import pytest
import uvicorn

from tests.integration.helpers import make_engine_core
from tests.serve_process import wait_healthy
from tokenforge.config import DEFAULT_MODEL
from tokenforge.engine.async_engine import AsyncEngine
from tokenforge.engine.engine_core import EngineCore
from tokenforge.server.app import create_app

MODEL = DEFAULT_MODEL
NUM_BLOCKS = 128  # 2,048 tokens of KV cache: the context, and what a freed request gives back


@dataclass
class RunningServer:
    base_url: str
    cores: dict[str, EngineCore]  # by served name
    engines: dict[str, AsyncEngine]
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def core(self) -> EngineCore:
        return next(iter(self.cores.values()))

    @property
    def engine(self) -> AsyncEngine:
        return next(iter(self.engines.values()))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        for engine in self.engines.values():
            engine.shutdown()


def make_server(loaded, names: tuple[str, ...] = (MODEL,), control=None, auth_required: bool = False,
                **engine_options) -> RunningServer:
    """Starts one engine per served name (over the same weights) and a server on a free port, with
    the control plane `control` if given; returns once /health answers 200."""
    cores = {name: make_engine_core(loaded, **engine_options) for name in names}
    engines = {name: AsyncEngine(core).start() for name, core in cores.items()}
    app = create_app(engines, control=control, auth_required=auth_required)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    running = RunningServer(f"http://127.0.0.1:{port}", cores, engines, server, thread)
    if wait_healthy(running.base_url, 30):
        return running
    running.stop()
    raise RuntimeError("the test server did not become healthy")


def wait_until_idle(core: EngineCore, engine: AsyncEngine, timeout_s: float = 5.0) -> bool:
    """True once no request is left in the engine and every KV block is free again."""
    deadline = time.monotonic() + timeout_s
    num_blocks = core.kv_cache_manager.block_pool.num_blocks
    while time.monotonic() < deadline:
        if (not core.has_unfinished_requests() and engine.num_unfinished() == 0
                and core.kv_cache_manager.num_free_blocks == num_blocks):
            return True
        time.sleep(0.02)
    return False


@pytest.fixture(scope="session")
def server(smollm2_loaded):
    running = make_server(smollm2_loaded, num_blocks=NUM_BLOCKS)
    yield running
    running.stop()


@pytest.fixture(scope="session")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="session")
def http(server):
    with httpx.Client(base_url=server.base_url, timeout=60) as http_client:
        yield http_client
