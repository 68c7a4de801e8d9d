"""Bad input raises a clear typed error, and the engine keeps serving afterwards."""

import pytest

from tests.integration.helpers import make_llm
from tokenforge.errors import InvalidRequestError, ModelFileError, ModelNotFoundError
from tokenforge.sampling_params import SamplingParams


@pytest.mark.parametrize("kwargs", [{"max_tokens": 0}, {"max_tokens": -3}, {"top_p": 0.0}, {"top_p": 1.5},
                                    {"temperature": -1.0}, {"top_k": 0}, {"logprobs": 99}, {"stop": [""]},
                                    {"stop": ["s"] * 17}, {"stop": ["z" * 257]}])
def test_invalid_sampling_params(kwargs):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.param == next(iter(kwargs))


def test_engine_rejects_bad_prompts_then_serves(smollm2_loaded):
    llm = make_llm(smollm2_loaded)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(InvalidRequestError, match="context"):
        llm.generate([[1] * llm.engine.max_model_len])
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate(["hi"], SamplingParams(logit_bias={-1: 5.0}))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["The sky is"], SamplingParams(temperature=0.0, max_tokens=5))
    assert len(out[0].outputs[0].token_ids) == 5


def test_unknown_model_name():
    from tokenforge import LLM

    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        LLM("no-such-model")


def test_non_gguf_file(tmp_path):
    from tokenforge import LLM

    bogus = tmp_path / "weights.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelFileError, match="weights.gguf"):
        LLM(str(bogus))
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(ModelFileError, match="cut.gguf"):
        LLM(str(truncated))


def test_extreme_sampling_values_do_not_break_the_engine(smollm2_loaded):
    """A subnormal temperature would overflow the logits; a top_k past the vocabulary would
    overflow a tensor: both are served (greedy, no top-k limit), and the engine stays up."""
    llm = make_llm(smollm2_loaded)
    greedy = llm.generate(["The sky is"], SamplingParams(temperature=0.0, max_tokens=6))[0].outputs[0]
    tiny = llm.generate(["The sky is"], SamplingParams(temperature=1e-45, max_tokens=6))[0].outputs[0]
    assert tiny.token_ids == greedy.token_ids
    huge_k = llm.generate(["The sky is"], SamplingParams(temperature=1.0, top_k=2**63, top_p=0.9, seed=1,
                                                         max_tokens=6))[0].outputs[0]
    assert len(huge_k.token_ids) == 6
    assert all(0 <= t < llm.engine.arch.vocab_size for t in huge_k.token_ids)
