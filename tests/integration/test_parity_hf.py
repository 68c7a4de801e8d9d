"""Greedy parity with Hugging Face transformers on the same GGUF weights (fp32).

The engine must produce the reference's greedy tokens one at a time, batched, from the prefix
cache, under preemption and with tiny prefill chunks. A divergence passes only at a genuine
near-tie: the reference's logits for the two tokens differ by less than NEAR_TIE (vLLM's
check_logprobs_close reasoning); the comparison of that prompt stops there.
"""

import pytest
import torch

from tests.integration.helpers import make_llm
from tokenforge.sampling_params import SamplingParams

NUM_NEW_TOKENS = 64
NEAR_TIE = 1e-3
MAX_LOGIT_DIFF = 2e-3  # next-token logits, fp32, same weights (seen: about 1e-4)
# The default CPU cache holds K/V in fp16 (rounded, relative error <= 2^-11): a wider near-tie
# (seen: no divergence at all over these prompts).
FP16_NEAR_TIE = 1e-2

SYSTEM = ("You are a meticulous assistant for a logistics company. Answer briefly, cite the rule you "
          "apply, and never invent shipment numbers. Rules: parcels over 30 kg go by freight; "
          "international parcels need a customs form; fragile goods get double boxing.")
CHATS = [
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "A 42 kg parcel to Lyon: how does it go?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do I need a form to ship glasses to Canada?"}],
    [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Summarise the rules as a list."}],
    [{"role": "user", "content": "Write a Python function that checks whether a number is prime."}],
    [{"role": "user", "content": "Translate to French: the weather is lovely today."}],
    [{"role": "user", "content": "What is 17 times 23? Explain step by step."}],
]
PLAIN = [
    "The history of the printing press begins in",
    "def quicksort(items):\n    ",
]


def _ref_greedy(model, token_ids: list[int], num_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """Plain greedy decoding with transformers' KV cache; also the raw logits of every step."""
    tokens, step_logits = [], []
    input_ids = torch.tensor([token_ids])
    past = None
    with torch.inference_mode():
        for _ in range(num_new):
            out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1].float()
            step_logits.append(logits)
            token = int(logits.argmax())
            tokens.append(token)
            input_ids = torch.tensor([[token]])
    return tokens, step_logits


@pytest.fixture(scope="module")
def prompts(smollm2_loaded):
    tokenizer = smollm2_loaded[0].tokenizer
    chats = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True) for c in CHATS]
    chats = [list(c["input_ids"]) if hasattr(c, "keys") else list(c) for c in chats]
    return chats + [tokenizer.encode(p) for p in PLAIN]


@pytest.fixture(scope="module")
def reference(smollm2_path, prompts):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, torch_dtype=torch.float32
    ).eval()
    return [_ref_greedy(model, p, NUM_NEW_TOKENS) for p in prompts]


def make_exact_llm(loaded, **options):
    """An engine with an fp32 KV cache: the reference's own precision."""
    return make_llm(loaded, cache_dtype="float32", **options)


def assert_matches_reference(outputs, reference, near_tie: float = NEAR_TIE) -> None:
    for index, (output, (ref_tokens, ref_logits)) in enumerate(zip(outputs, reference)):
        got = output.outputs[0].token_ids
        assert len(got) == NUM_NEW_TOKENS, f"prompt {index}: {len(got)} tokens"
        for step, (ours, theirs) in enumerate(zip(got, ref_tokens)):
            if ours == theirs:
                continue
            gap = abs(float(ref_logits[step][theirs] - ref_logits[step][ours]))
            assert gap < near_tie, (
                f"prompt {index} diverges at step {step}: ours {ours}, reference {theirs}, logit gap {gap:.2e}"
            )
            break  # a genuine near-tie: the continuations legitimately differ from here


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def test_one_at_a_time(smollm2_loaded, prompts, reference):
    llm = make_exact_llm(smollm2_loaded, prefix_caching=False)
    outputs = [llm.generate([p], GREEDY)[0] for p in prompts]
    assert_matches_reference(outputs, reference)


def test_all_batched(smollm2_loaded, prompts, reference):
    llm = make_exact_llm(smollm2_loaded, prefix_caching=False)
    assert_matches_reference(llm.generate(prompts, GREEDY), reference)


def test_shared_prefix_from_prefix_cache(smollm2_loaded, prompts, reference):
    llm = make_exact_llm(smollm2_loaded)
    first = llm.generate([prompts[0]], GREEDY)
    rest = llm.generate(prompts[1:], GREEDY)
    # The long system prompt is computed once: the other two system-prompt chats hit the cache.
    assert first[0].num_cached_tokens == 0
    assert rest[0].num_cached_tokens >= 48 and rest[1].num_cached_tokens >= 48
    assert_matches_reference(first + rest, reference)


def test_under_preemption(smollm2_loaded, prompts, reference):
    # 24 blocks of 16 tokens hold about 4 of these sequences: requests are preempted constantly.
    llm = make_exact_llm(smollm2_loaded, num_blocks=24, prefix_caching=False)
    outputs = llm.generate(prompts, GREEDY)
    assert llm.engine.scheduler.num_preemptions > 0
    assert_matches_reference(outputs, reference)


def test_small_prefill_chunks(smollm2_loaded, prompts, reference):
    llm = make_exact_llm(smollm2_loaded, max_num_batched_tokens=7)
    assert_matches_reference(llm.generate(prompts, GREEDY), reference)


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])  # whole prompts; chunks that read the cache
def test_fp16_cache(smollm2_loaded, prompts, reference, max_num_batched_tokens):
    llm = make_llm(smollm2_loaded, prefix_caching=False, cache_dtype="float16",
                   max_num_batched_tokens=max_num_batched_tokens)
    assert_matches_reference(llm.generate(prompts, GREEDY), reference, near_tie=FP16_NEAR_TIE)


def test_prompt_logits_close(smollm2_loaded, smollm2_path, prompts):
    """Next-token logits at the end of each prompt against transformers' forward pass."""
    from transformers import AutoModelForCausalLM

    from tokenforge.engine.request import Request

    hf = AutoModelForCausalLM.from_pretrained(
        str(smollm2_path.parent), gguf_file=smollm2_path.name, torch_dtype=torch.float32
    ).eval()
    engine = make_exact_llm(smollm2_loaded, prefix_caching=False).engine
    for index, token_ids in enumerate(prompts):
        engine.scheduler.add_request(Request(f"logits-{index}", token_ids, SamplingParams(max_tokens=1)))
    scheduled = engine.scheduler.schedule()
    batch = engine.runner.prepare(scheduled)
    with torch.inference_mode():
        hidden = engine.runner.model(batch.input_ids, batch.positions, engine.runner.kv_caches, batch.meta)
        ours = engine.runner.model.compute_logits(hidden[batch.logits_indices])
        for request, rows in zip(scheduled.scheduled_requests, batch.logits_rows):
            theirs = hf(input_ids=torch.tensor([request.prompt_token_ids])).logits[0, -1]
            diff = float((ours[rows.start] - theirs).abs().max())
            assert diff < MAX_LOGIT_DIFF, f"prompt {request.request_id}: max |logit diff| {diff:.2e}"
