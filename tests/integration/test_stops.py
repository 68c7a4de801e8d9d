"""Stop conditions on the real model: what ends a request and what text it leaves."""

import pytest

from tests.integration.helpers import make_llm
from tokenforge.engine.request import FinishReason
from tokenforge.sampling_params import SamplingParams

PROMPT = "List the planets of the solar system, one per line:"


@pytest.fixture(scope="module")
def llm(smollm2_loaded):
    return make_llm(smollm2_loaded)


@pytest.fixture(scope="module")
def base(llm):
    """The plain greedy continuation every test below cuts short."""
    return llm.generate([PROMPT], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].outputs[0]


def run(llm, **options):
    return llm.generate([PROMPT], SamplingParams(temperature=0.0, ignore_eos=True, **options))[0].outputs[0]


def test_stop_token_text_is_not_in_the_output(llm, base):
    stop_id = base.token_ids[3]
    first = base.token_ids.index(stop_id)  # the token may occur earlier than index 3
    out = run(llm, max_tokens=24, stop_token_ids=[stop_id])
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop_id
    assert out.text == llm.tokenizer.decode(base.token_ids[:first])
    kept = run(llm, max_tokens=24, stop_token_ids=[stop_id], include_stop_str_in_output=True)
    assert kept.text == llm.tokenizer.decode(base.token_ids[: first + 1])


def test_stop_string_waits_for_min_tokens(llm, base):
    stop = llm.tokenizer.decode(base.token_ids[:2])  # complete after the second token
    early = run(llm, max_tokens=24, stop=[stop])
    assert len(early.token_ids) == 2 and early.text == "" and early.finish_reason == FinishReason.STOP
    late = run(llm, max_tokens=24, stop=[stop], min_tokens=8)
    assert len(late.token_ids) >= 8  # the early match is ignored while min_tokens are owed


def test_stop_string_on_the_last_allowed_token_reports_stop(llm, base):
    stop = llm.tokenizer.decode(base.token_ids[:5])  # first complete at token 5, which is max_tokens
    out = run(llm, max_tokens=5, stop=[stop])
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop
    assert out.text == ""
