"""Speculative decoding through the HTTP server: the same text as a plain server, per-request
num_speculative_tokens (0 turns it off), a bad value refused in OpenAI's shape, and the counters on
/metrics moving with what the engine drafted and accepted."""

import re

import httpx
import pytest

from tests.integration.server.conftest import MODEL, make_server
from tokenforge.config import SpeculativeConfig

PROMPT = "The cat sat on the mat. The dog sat on the log. The cat sat on the mat. The dog sat on the"


@pytest.fixture(scope="module")
def servers(smollm2_loaded):
    plain = make_server(smollm2_loaded)
    spec = make_server(smollm2_loaded, speculative=SpeculativeConfig(method="ngram", num_speculative_tokens=4))
    yield plain, spec
    plain.stop()
    spec.stop()


def complete(base_url: str, **extra) -> httpx.Response:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 24, "temperature": 0.0, **extra}
    return httpx.post(f"{base_url}/v1/completions", json=body, timeout=60)


def spec_counter(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    match = re.search(rf'^tokenforge_spec_decode_{name}{{model="{MODEL}"}} (\S+)$', text, re.MULTILINE)
    assert match, text[-2000:]
    return float(match.group(1))


def test_speculating_server_answers_as_the_plain_one_and_counts(servers):
    plain, spec = servers
    before = spec_counter(spec.base_url, "num_draft_tokens")
    expected = complete(plain.base_url).json()["choices"][0]["text"]
    reply = complete(spec.base_url)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected
    assert reply.json()["usage"]["completion_tokens"] == 24  # counted once, drafts or not
    drafted = spec_counter(spec.base_url, "num_draft_tokens")
    accepted = spec_counter(spec.base_url, "num_accepted_tokens")
    assert drafted > before and 0 < accepted <= drafted  # the repeating text is easy to look up
    assert 0 < spec_counter(spec.base_url, "acceptance_rate") <= 1


def test_per_request_switch_off_and_bad_values(servers):
    _, spec = servers
    drafted = spec_counter(spec.base_url, "num_draft_tokens")
    assert complete(spec.base_url, num_speculative_tokens=0).status_code == 200
    assert spec_counter(spec.base_url, "num_draft_tokens") == drafted
    reply = complete(spec.base_url, num_speculative_tokens=-1)
    assert reply.status_code == 400
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == "num_speculative_tokens"
