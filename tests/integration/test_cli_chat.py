"""`tokenforge chat` on the real model: local mode and --url mode give the greedy replies of
LLM.chat over the same history; /reset starts over; a failed turn leaves the chat running."""

import io
import socket
import subprocess
import sys

import pytest

from tests.integration.helpers import make_llm
from tests.integration.server.conftest import make_server
from tokenforge.cli.main import main
from tokenforge.engine.engine_core import EngineCore
from tokenforge.sampling_params import SamplingParams

SYSTEM = "You are a terse assistant."
FIRST, SECOND = "Hi, my name is Ada.", "What is my name?"
MAX_TOKENS = 8
GREEDY_ARGS = ["--temperature", "0", "--max-tokens", str(MAX_TOKENS), "--system", SYSTEM]
# A conversation, a /reset, then the first message again: its reply must repeat the first reply.
SCRIPT = f"{FIRST}\n\n{SECOND}\n/reset\n/nonsense\n{FIRST}\n/exit\nnever read\n"


@pytest.fixture(scope="module")
def expected_replies(smollm2_loaded) -> tuple[str, str]:
    llm = make_llm(smollm2_loaded)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    history = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": FIRST}]
    first = llm.chat(history, params)[0].outputs[0].text
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": SECOND}]
    second = llm.chat(history, params)[0].outputs[0].text
    return first, second


@pytest.fixture
def local_engine(smollm2_loaded, monkeypatch):
    """`chat` builds its engine from its own options, over the already loaded weights."""
    def build_engine_core(config):
        return EngineCore(config, *smollm2_loaded)

    monkeypatch.setattr("tokenforge.engine.factory.build_engine_core", build_engine_core)


@pytest.fixture(scope="module")
def chat_server(smollm2_loaded):
    running = make_server(smollm2_loaded, num_blocks=64)
    yield running
    running.stop()


def run_chat(monkeypatch, capsys, script: str, argv: list[str]) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    status = main(["chat", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_local_chat_keeps_history_and_resets(local_engine, expected_replies, monkeypatch, capsys):
    first, second = expected_replies
    status, out, err = run_chat(monkeypatch, capsys, SCRIPT, [*GREEDY_ARGS, "--kv-cache-memory", "64MiB"])
    assert status == 0
    assert out == f"{first}\n{second}\n{first}\n"
    assert "(conversation cleared)" in err and "unknown command '/nonsense'" in err


def test_local_chat_survives_a_prompt_over_the_context(local_engine, expected_replies, monkeypatch, capsys):
    too_long = "word " * 200
    status, out, err = run_chat(monkeypatch, capsys, f"{too_long}\n{FIRST}\n",
                                [*GREEDY_ARGS, "--kv-cache-memory", "64MiB", "--max-model-len", "128"])
    assert status == 0
    assert "error:" in err and "/reset" in err
    assert out == f"{expected_replies[0]}\n"  # the failed turn left no trace in the history


def test_url_chat_matches_the_local_engine(chat_server, expected_replies, monkeypatch, capsys):
    first, second = expected_replies
    status, out, err = run_chat(monkeypatch, capsys, SCRIPT, ["--url", f"{chat_server.base_url}/v1", *GREEDY_ARGS])
    assert status == 0, err
    assert out == f"{first}\n{second}\n{first}\n"
    assert "smollm2-135m-instruct at http://127.0.0.1" in err


def test_url_chat_reports_a_refused_turn_and_goes_on(chat_server, monkeypatch, capsys):
    status, out, err = run_chat(monkeypatch, capsys, "Hi\n",
                                ["--url", f"{chat_server.base_url}/v1", "--model", "no-such-model"])
    assert status == 0 and out == ""
    assert "error:" in err and "no-such-model" in err


def test_url_chat_without_a_server_fails_cleanly(monkeypatch, capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    status, _, err = run_chat(monkeypatch, capsys, "Hi\n", ["--url", f"http://127.0.0.1:{port}/v1"])
    assert status == 1 and "cannot list the models" in err


@pytest.mark.slow
def test_chat_reads_a_pipe(expected_replies):
    """The real command in a subprocess, stdin a pipe that ends without /exit."""
    result = subprocess.run(
        [sys.executable, "-m", "tokenforge.cli.main", "chat", *GREEDY_ARGS, "--device", "cpu", "--dtype", "float32",
         "--kv-cache-memory", "64MiB"],
        input=f"{FIRST}\n", capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{expected_replies[0]}\n"
