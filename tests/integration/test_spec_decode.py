"""Speculative decoding on the real model: greedy output is unchanged token for token, with
n-gram lookup and with a draft model, batched and alone; sampling keeps the target's distribution."""

import copy
import dataclasses

import pytest
import torch

from tests.integration.helpers import make_llm
from tokenforge.config import SpeculativeConfig
from tokenforge.engine.factory import pick_draft_quantization, pick_quantization
from tokenforge.engine.llm import LLM
from tokenforge.engine.request import FinishReason, Request
from tokenforge.model.layers.quant_block import BLOCK_DIGITS
from tokenforge.model.layers.quant_linear import Int8Linear
from tokenforge.sampling_params import SamplingParams

PROMPTS = [
    "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
    "def factorial(n):\n",
    "The cat sat on the mat. The dog sat on the log. The cat sat on the",
    "Write one sentence about the sea.",
]
MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
# Always draft k tokens (no adaptive switch-off), so that every step exercises verification.
NGRAM = SpeculativeConfig(method="ngram", num_speculative_tokens=4, adaptive=False, max_num_seqs=1024)
DRAFT = dataclasses.replace(NGRAM, method="draft", num_speculative_tokens=3)
DRAFT_HEAD = dataclasses.replace(DRAFT, draft_head_ids=1000)  # the draft's head over the first 1000 ids
HYBRID = dataclasses.replace(DRAFT, method="hybrid")


def make_draft(loaded, num_layers: int):
    """A copy of the model that keeps its first num_layers layers: same vocabulary, weaker."""
    model, dtype, device = loaded
    draft = copy.deepcopy(model.model)
    draft.layers = draft.layers[:num_layers]
    arch = dataclasses.replace(model.arch_config, num_layers=num_layers)
    draft.config = arch
    return dataclasses.replace(model, model=draft, arch_config=arch)


@pytest.fixture(scope="module")
def plain(smollm2_loaded):
    return make_llm(smollm2_loaded)


@pytest.fixture(scope="module")
def expected(plain):
    """Greedy outputs without speculation, all prompts in one batch."""
    return [out.outputs[0].token_ids for out in plain.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def short_draft(smollm2_loaded):
    return make_draft(smollm2_loaded, 12)


def token_ids(llm, prompts, params=GREEDY):
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def test_ngram_greedy_batched_equals_plain(smollm2_loaded, expected):
    llm = make_llm(smollm2_loaded, speculative=NGRAM)
    assert token_ids(llm, PROMPTS) == expected
    stats = llm.engine.stats()
    assert stats["spec_num_accepted_tokens"] > 0  # speculation did happen, and paid off somewhere
    assert stats["spec_num_draft_tokens"] > stats["spec_num_accepted_tokens"]  # and was rejected too


def test_ngram_greedy_one_at_a_time_equals_plain(smollm2_loaded, expected):
    llm = make_llm(smollm2_loaded, speculative=NGRAM)
    for prompt, want in list(zip(PROMPTS, expected))[:2]:
        assert token_ids(llm, [prompt]) == [want]


def test_ngram_with_preemption_and_rollback_in_a_small_cache(smollm2_loaded, expected):
    """Blocks of 4 tokens and barely enough of them: rejected drafts' blocks are rolled back,
    and requests are preempted and recomputed, yet the output does not change."""
    llm = make_llm(smollm2_loaded, speculative=NGRAM, block_size=4, num_blocks=48)
    assert token_ids(llm, PROMPTS) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.kv_cache_manager.num_free_blocks == 48


def test_draft_model_greedy_batched_equals_plain(smollm2_loaded, short_draft, expected):
    llm = make_llm(smollm2_loaded, speculative=DRAFT, draft=short_draft)
    assert token_ids(llm, PROMPTS) == expected
    stats = llm.engine.stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    assert llm.engine.spec.proposer.sequences == {}  # the draft's blocks are released
    assert llm.engine.spec.proposer.block_pool.num_free_blocks == llm.engine.spec.proposer.block_pool.num_blocks


def test_a_draft_head_over_the_first_ids_changes_no_output(smollm2_loaded, short_draft, expected):
    """--draft-head-ids: the draft's logits over the first ids only (-inf past them, so q is 0 there
    and those ids are never proposed); the rest of its logits as the whole head's."""
    llm = make_llm(smollm2_loaded, speculative=DRAFT_HEAD, draft=short_draft)
    assert token_ids(llm, PROMPTS) == expected
    stats = llm.engine.stats()
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    proposer = llm.engine.spec.proposer
    hidden = torch.randn(3, short_draft.arch_config.hidden_size)
    limited, whole = proposer._logits(hidden), short_draft.model.compute_logits(hidden)
    assert limited.shape == whole.shape
    assert torch.isneginf(limited[:, DRAFT_HEAD.draft_head_ids:]).all()
    assert torch.allclose(limited[:, :DRAFT_HEAD.draft_head_ids], whole[:, :DRAFT_HEAD.draft_head_ids], atol=1e-4)


def test_hybrid_uses_both_proposers_and_changes_no_output(smollm2_loaded, short_draft, expected):
    """The lookup serves the prompts that repeat themselves ("Count: ...", "The cat sat ..."), the
    draft model the rest; batched or alone, the output is the plain engine's."""
    llm = make_llm(smollm2_loaded, speculative=HYBRID, draft=short_draft)
    assert token_ids(llm, PROMPTS) == expected
    assert token_ids(llm, PROMPTS[1:2]) == expected[1:2]
    proposer = llm.engine.spec.proposer
    assert proposer.num_lookup_proposals > 0 and proposer.num_draft_proposals > 0
    assert proposer.tracks == {} and proposer.draft.sequences == {}  # released


def test_hybrid_times_the_draft_catching_up_on_lookup_rounds(smollm2_loaded, expected):
    """After lookup rounds the draft catches up on their tokens: a cost of its round, which the
    switch-off times (num_extra_tokens 0)."""
    model, _, _ = smollm2_loaded
    llm = make_llm(smollm2_loaded, speculative=HYBRID, draft=model)
    proposer = llm.engine.spec.proposer
    made, propose = {}, proposer.draft.propose

    def recording_propose(requests, num_tokens):  # the draft's proposals, and what they said then
        proposals = propose(requests, num_tokens)
        for request_id, proposal in proposals.items():
            made.setdefault(request_id, []).append((proposal, proposal.num_extra_tokens))
        return proposals

    proposer.draft.propose = recording_propose
    assert token_ids(llm, PROMPTS) == expected
    assert proposer.num_lookup_proposals > 0
    rounds = [(raw, proposal.num_extra_tokens) for made_for_one in made.values() for proposal, raw in made_for_one]
    assert max(raw for raw, _ in rounds) > 0  # the draft caught up on lookup rounds' tokens at least once ...
    assert all(reported == 0 for _, reported in rounds)  # ... reported as a round's cost (its prompt: at prefill)


def record_extra_tokens(proposer) -> list[int]:
    """Wraps proposer.propose; the returned list fills with each proposal's num_extra_tokens."""
    extra, propose = [], proposer.propose

    def recording_propose(requests, num_tokens):
        proposals = propose(requests, num_tokens)
        extra.extend(proposal.num_extra_tokens for proposal in proposals.values())
        return proposals

    proposer.propose = recording_propose
    return extra


def test_model_drafting_for_itself_is_always_accepted(smollm2_loaded, expected):
    """The draft's own KV cache bookkeeping (catch-up after accepts, overwrite after rejects) is
    right only if a draft identical to the target agrees with it at every position."""
    model, _, _ = smollm2_loaded
    llm = make_llm(smollm2_loaded, speculative=DRAFT, draft=model)
    assert token_ids(llm, PROMPTS[:1]) == expected[:1]
    stats = llm.engine.stats()
    assert stats["spec_acceptance_rate"] > 0.95, stats


def test_the_draft_runs_over_the_prompt_at_prefill_and_rounds_catch_up_on_a_round(smollm2_loaded):
    """The draft's pass over the prompt runs at the prefill step (prepare); every drafting round
    after it catches up on at most a round's two tokens: none extra. A request the draft never saw
    says, at its first round, that it caught up on more (the switch-off does not time that round)."""
    model, _, _ = smollm2_loaded
    llm = make_llm(smollm2_loaded, speculative=DRAFT, draft=model)
    proposer = llm.engine.spec.proposer
    prepared, prepare = [], proposer.prepare
    proposer.prepare = lambda requests: (prepared.extend(r.num_tokens for r in requests), prepare(requests))[-1]
    extra = record_extra_tokens(proposer)
    prompt_ids = llm.engine.tokenizer.encode(PROMPTS[0])
    token_ids(llm, PROMPTS[:1])
    assert prepared == [len(prompt_ids) + 1]  # at the step that sampled the first token
    assert len(extra) > 3 and all(count == 0 for count in extra)
    late = Request("late", prompt_ids, GREEDY)
    late.output_token_ids, late.num_computed_tokens = [5], len(prompt_ids)
    (proposal,) = proposer.propose([late], {"late": 2}).values()
    assert proposal.num_extra_tokens == len(prompt_ids) + 1 - 2  # the prompt and the first token, less a round's two


def test_stop_string_inside_accepted_drafts_cuts_the_output_as_without(smollm2_loaded, plain, expected):
    text = plain.tokenizer.decode(expected[0][:6])
    stop = text[-3:]  # ends inside the 6th token, which an n-gram draft accepts with others
    params = dataclasses.replace(GREEDY, stop=[stop])
    llm = make_llm(smollm2_loaded, speculative=NGRAM)
    with_spec = llm.generate([PROMPTS[0]], params)[0].outputs[0]
    without = plain.generate([PROMPTS[0]], params)[0].outputs[0]
    assert with_spec.finish_reason == without.finish_reason == FinishReason.STOP
    assert (with_spec.token_ids, with_spec.text) == (without.token_ids, without.text)


def test_per_request_switch_off(smollm2_loaded, expected):
    llm = make_llm(smollm2_loaded, speculative=NGRAM)
    off = dataclasses.replace(GREEDY, num_speculative_tokens=0)
    assert token_ids(llm, PROMPTS[:1], off) == expected[:1]
    assert llm.engine.stats()["spec_num_drafts"] == 0


# --- temperature > 0: the distribution is the target's ----------------------------------------

# The n-gram draft (" three one two ...") is the likeliest continuation, but far from certain.
STAT_PROMPT = "one two three one two three one two three one two"
NUM_SAMPLES = 200
NUM_STAT_TOKENS = 4
SAMPLED = SamplingParams(temperature=1.0, max_tokens=NUM_STAT_TOKENS, ignore_eos=True, seed=1000, n=NUM_SAMPLES)


def sample_tuples(llm) -> list[tuple[int, ...]]:
    return [tuple(c.token_ids) for c in llm.generate([STAT_PROMPT], SAMPLED)[0].outputs]


def two_sample_p_value(a: list, b: list) -> float:
    """Chi-square test that two equal-sized samples share one distribution; categories with
    fewer than 10 pooled counts are lumped together. 1.0 when there is one category only."""
    assert len(a) == len(b)
    counts: dict = {}
    for sample, column in ((a, 0), (b, 1)):
        for value in sample:
            counts.setdefault(value, [0, 0])[column] += 1
    rare = [0, 0]
    cells = []
    for pair in counts.values():
        if sum(pair) >= 10:
            cells.append(pair)
        else:
            rare = [rare[0] + pair[0], rare[1] + pair[1]]
    if sum(rare):
        cells.append(rare)
    statistic = sum((x - y) ** 2 / (x + y) for x, y in cells)
    dof = len(cells) - 1
    if dof == 0:
        return 1.0
    return torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)).item()


def min_p_value(a: list[tuple], b: list[tuple]) -> float:
    """The smallest p-value over each position's marginal and the pairs (t1, t2) and (t2, t3)
    (whole 4-token tuples are too spread out at temperature 1 for a chi-square test)."""
    views = [lambda t, i=i: t[i] for i in range(NUM_STAT_TOKENS)]
    views += [lambda t: t[:2], lambda t: t[1:3]]
    return min(two_sample_p_value([view(t) for t in a], [view(t) for t in b]) for view in views)


@pytest.fixture(scope="module")
def target_samples(plain):
    return sample_tuples(plain)


@pytest.mark.parametrize("method", ["ngram", "draft", "draft_head", "hybrid"])
def test_sampled_tokens_follow_the_target_distribution(smollm2_loaded, short_draft, target_samples, method):
    config = {"ngram": NGRAM, "draft": DRAFT, "draft_head": DRAFT_HEAD, "hybrid": HYBRID}[method]
    llm = make_llm(smollm2_loaded, speculative=config, draft=None if method == "ngram" else short_draft)
    samples = sample_tuples(llm)
    stats = llm.engine.stats()
    assert stats["spec_num_drafts"] >= NUM_SAMPLES / 2  # most samples went through verification
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]  # accepts and rejects
    assert min_p_value(target_samples, samples) > 1e-3 / 6  # six views: Bonferroni


def test_the_distribution_check_can_fail(smollm2_loaded, short_draft, target_samples):
    """The short draft alone samples from another distribution: the same check rejects it."""
    draft_alone = make_llm((short_draft, *smollm2_loaded[1:]))
    assert min_p_value(target_samples, sample_tuples(draft_alone)) < 1e-3 / 6


def test_seeded_sampling_with_speculation_reproduces(smollm2_int8_loaded):
    """A seeded request samples the same tokens alone or beside another (whose drafts change how its
    tokens are grouped into verification chunks): on the served int8 path, bits never depend on the batch."""
    llm = make_llm(smollm2_int8_loaded, speculative=NGRAM)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    first = token_ids(llm, [STAT_PROMPT], params)
    assert token_ids(llm, [STAT_PROMPT, PROMPTS[0]], params)[0] == first[0]


def test_factory_draft_has_its_own_quantization_a_measured_cost_and_changes_no_output(smollm2_path):
    """The served path: the draft loads through the factory with its own quantization (auto: 8-bit
    activations on the CPU, w8a8-block where the native kernels run, else w8a8), its cost is timed at
    start, and the greedy output is the plain engine's."""
    plain = LLM(str(smollm2_path), device="cpu", kv_cache_memory_bytes=64 * 2**20)
    spec = LLM(str(smollm2_path), device="cpu", kv_cache_memory_bytes=64 * 2**20,
               speculative=dataclasses.replace(DRAFT, draft_model=str(smollm2_path)))
    proposer = spec.engine.spec.proposer
    digits = {m.activation_digits for m in proposer.model.modules() if isinstance(m, Int8Linear)}
    draft_auto = pick_draft_quantization("auto", torch.device("cpu"))
    assert digits == ({BLOCK_DIGITS} if draft_auto == "w8a8-block" else {1})
    auto = pick_quantization("auto", torch.device("cpu"), True)  # the target keeps its own: w8a8-block or int8
    expected = {BLOCK_DIGITS} if auto == "w8a8-block" else {2}
    assert {m.activation_digits for m in spec.engine.runner.model.modules() if isinstance(m, Int8Linear)} == expected
    assert 0 < proposer.draft_cost < float("inf")  # timed, not the parameter ratio (1.0 for a self-draft)
    assert 0 <= spec.engine.spec.verify_cost < float("inf")  # timed too: (k + 1)-token pass vs 1-token pass
    assert token_ids(spec, PROMPTS) == token_ids(plain, PROMPTS)
    stats = spec.engine.stats()
    if draft_auto == auto:  # a self-draft with the target's own layers: the same bits, every greedy draft kept
        assert 0 < stats["spec_num_accepted_tokens"] == stats["spec_num_draft_tokens"]
    else:  # w8a8 disagrees at times
        assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
