"""Sampler on a small vocabulary: seeded draws, filters, penalties, bias, min_tokens, logprobs."""

import math

import pytest
import torch

from tokenforge.engine.request import Request
from tokenforge.sampling_params import SamplingParams
from tokenforge.worker import sampler as sampler_module
from tokenforge.worker.sampler import (
    Sampler,
    apply_penalties,
    filter_top_candidates,
    sample_from_probs,
)

VOCAB_SIZE = 64
NUM_DRAWS = 4000


def make_request(
    request_id: str = "r",
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos_token_id: int | None = None,
    **params,
) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=prompt if prompt is not None else [1, 2, 3],
        sampling_params=SamplingParams(**params),
        eos_token_id=eos_token_id,
        output_token_ids=list(output or []),
    )


def make_logits(num_rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_rows, VOCAB_SIZE, generator=generator) * 3  # [num_rows, VOCAB_SIZE]


def make_logits_from_probs(probs: list[float]) -> torch.Tensor:
    """[VOCAB_SIZE]: the given probabilities on the first tokens, about 1e-13 on the rest."""
    logits = torch.full((VOCAB_SIZE,), -30.0)
    logits[: len(probs)] = torch.tensor([math.log(p) for p in probs])
    return logits


def draw_many(logits_row: torch.Tensor, **params) -> set[int]:
    """Samples NUM_DRAWS times from one row of logits; returns the tokens seen."""
    request = make_request(**params)
    logits = logits_row.unsqueeze(0).expand(NUM_DRAWS, -1).contiguous()
    return set(Sampler()(logits, [request] * NUM_DRAWS).sampled_token_ids)


def run_seeded(seed: int, num_others: int, position: int, **params) -> list[int]:
    """30 tokens a request with this seed draws from fixed logits, among other sampled rows."""
    target = make_request("target", temperature=1.0, seed=seed, **params)
    others = [
        make_request(f"o{i}", temperature=0.7, top_p=0.9, top_k=10 * i + 1)
        for i in range(num_others)
    ]
    requests = others[:position] + [target] + others[position:]
    target_logits = make_logits(1, seed=100)  # [1, VOCAB_SIZE], the same every step
    sampler = Sampler()
    tokens = []
    for step in range(30):
        other_logits = make_logits(num_others, seed=step)
        logits = torch.cat([other_logits[:position], target_logits, other_logits[position:]])
        tokens.append(sampler(logits, requests).sampled_token_ids[position])
    return tokens


def test_greedy_equals_argmax_and_leaves_logits_untouched():
    logits = make_logits(8)
    before = logits.clone()
    requests = [make_request(str(i), temperature=0.0) for i in range(8)]
    output = Sampler()(logits, requests)
    assert output.sampled_token_ids == logits.argmax(dim=-1).tolist()
    assert output.logprobs == [None] * 8
    requests[0] = make_request("p", temperature=0.5, top_p=0.5, logit_bias={1: 9.0}, logprobs=2)
    requests[1] = make_request("q", output=[4, 4], repetition_penalty=1.3, frequency_penalty=1.0)
    Sampler()(logits, requests)
    assert torch.equal(logits, before)
    Sampler()(logits, [make_request(str(i), temperature=0.7) for i in range(8)])  # all sampled
    assert torch.equal(logits, before)


def test_seeded_rows_are_reproducible_across_batches():
    alone = run_seeded(seed=7, num_others=0, position=0)
    assert run_seeded(seed=7, num_others=5, position=3) == alone
    assert run_seeded(seed=7, num_others=2, position=0) == alone
    assert len(set(alone)) > 1  # really sampled
    assert run_seeded(seed=8, num_others=0, position=0) != alone


def test_seeded_filtered_rows_are_reproducible_across_batches(monkeypatch):
    # Few candidates, so the target's top-p set sometimes needs the full-vocabulary retry; the
    # others' top_k (up to 41) widens the candidate set of the whole batch.
    monkeypatch.setattr(sampler_module, "NUM_CANDIDATES", 4)
    alone = run_seeded(seed=3, num_others=0, position=0, top_p=0.8, min_p=0.01)
    assert run_seeded(seed=3, num_others=5, position=2, top_p=0.8, min_p=0.01) == alone
    assert len(set(alone)) > 1


def test_top_k_never_leaves_the_top_k():
    logits = make_logits(1, seed=1)[0]
    allowed = set(logits.topk(5).indices.tolist())
    seen = draw_many(logits, temperature=1.5, top_k=5)
    assert seen <= allowed
    assert len(seen) >= 4  # sampling, not a collapsed argmax


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = make_logits_from_probs([0.5, 0.3, 0.15, 0.04, 0.01])
    assert draw_many(logits, temperature=1.0, top_p=0.75) == {0, 1}
    assert draw_many(logits, temperature=1.0, top_p=0.9) == {0, 1, 2}
    assert draw_many(logits, temperature=1.0, top_p=0.1) == {0}


def test_top_p_past_the_candidates_uses_the_whole_vocabulary(monkeypatch):
    monkeypatch.setattr(sampler_module, "NUM_CANDIDATES", 2)
    logits = make_logits_from_probs([0.34, 0.33, 0.33])
    assert draw_many(logits, temperature=1.0, top_p=0.9) == {0, 1, 2}
    assert draw_many(logits, temperature=1.0, top_p=0.9, top_k=2) == {0, 1}


def test_min_p_drops_unlikely_tokens():
    logits = make_logits_from_probs([0.5, 0.3, 0.12, 0.08])
    # 0.2 * 0.5 = 0.1: token 3 (0.08) goes, token 2 (0.12) stays.
    assert draw_many(logits, temperature=1.0, min_p=0.2) == {0, 1, 2}


def test_filter_top_candidates_directly():
    logits = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3], [0.1, 0.4, 0.2, 0.3]]))
    no_limit = torch.tensor([4, 4])
    probs, ids, covered = filter_top_candidates(
        logits, no_limit, torch.tensor([0.65, 1.0]), torch.tensor([0.0, 0.6]), num_candidates=4
    )
    assert ids.tolist() == [[1, 3, 2, 0]] * 2
    # Row 0, top-p 0.65: 0.4 + 0.3 reaches it. Row 1, min-p 0.6: 0.6 * 0.4 = 0.24 drops 0.2, 0.1.
    assert torch.allclose(probs, torch.tensor([[0.4, 0.3, 0.0, 0.0], [0.4, 0.3, 0.0, 0.0]]))
    assert covered.tolist() == [True, True]
    probs, ids, covered = filter_top_candidates(
        logits, torch.tensor([2, 4]), torch.tensor([1.0, 0.8]), torch.tensor([0.0, 0.0]), 2
    )
    # Row 0, top-k 2: renormalised over its two tokens. Row 1: top-p 0.8 needs a third token.
    assert torch.allclose(probs, torch.tensor([[4 / 7, 3 / 7], [0.4, 0.3]]))
    assert covered.tolist() == [True, False]
    _, _, covered = filter_top_candidates(
        logits, no_limit, torch.tensor([1.0, 1.0]), torch.tensor([0.8, 0.4]), 2
    )
    # min-p covers when the last candidate is already dropped: 0.3 < 0.8 * 0.4, not < 0.4 * 0.4.
    assert covered.tolist() == [True, False]


def test_sample_from_probs_never_picks_zero_probability():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(NUM_DRAWS, -1)
    assert set(sample_from_probs(probs, [None] * NUM_DRAWS).tolist()) == {1, 3}


def test_penalties_follow_the_formulas():
    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0, 1.0], [2.0, -2.0, 2.0, -2.0, 1.0]])
    apply_penalties(
        logits,
        prompt_token_ids=[[0, 1], [0, 1]],
        output_token_ids=[[2, 3, 2, 2], [3, 2, 2, 2]],  # token 2 three times, token 3 once
        repetition_penalties=torch.tensor([2.0, 1.0]),
        frequency_penalties=torch.tensor([0.5, 0.0]),
        presence_penalties=torch.tensor([0.25, -1.0]),
    )
    expected = torch.tensor(
        [
            # seen tokens: /2 or *2; output tokens also lose count * 0.5 + 0.25; token 4 unseen.
            [1.0, -4.0, 1.0 - 1.5 - 0.25, -4.0 - 0.5 - 0.25, 1.0],
            # no repetition or frequency penalty; presence -1 adds 1 to each output token.
            [2.0, -2.0, 3.0, -1.0, 1.0],
        ]
    )
    assert torch.allclose(logits, expected)


def test_sampler_applies_penalties_from_token_lists():
    logits = torch.zeros(1, VOCAB_SIZE)
    logits[0, 5] = 1.0  # the argmax, until penalised
    logits[0, 6] = 0.9
    request = make_request(prompt=[5], temperature=0.0, repetition_penalty=2.0)
    assert Sampler()(logits, [request]).sampled_token_ids == [6]
    request = make_request(prompt=[], output=[5], temperature=0.0, frequency_penalty=0.2)
    assert Sampler()(logits, [request]).sampled_token_ids == [6]
    request = make_request(prompt=[5], temperature=0.0, presence_penalty=2.0)
    assert Sampler()(logits, [request]).sampled_token_ids == [5]  # the prompt does not count


def test_logit_bias_forces_a_token():
    logits = make_logits(5, seed=2)
    requests = [make_request(str(i), temperature=1.0, logit_bias={17: 100.0}) for i in range(4)]
    requests.append(make_request("g", temperature=0.0, logit_bias={3: 100.0}))
    assert Sampler()(logits, requests).sampled_token_ids == [17, 17, 17, 17, 3]


def test_min_tokens_blocks_eos_and_stop_ids():
    logits = torch.zeros(2, VOCAB_SIZE)
    logits[:, 0] = 50.0  # eos
    logits[:, 1] = 40.0  # stop token id
    logits[:, 2] = 30.0
    params = dict(temperature=0.0, min_tokens=3, stop_token_ids=[1], eos_token_id=0)
    blocked = make_request("b", output=[9, 9], **params)
    done = make_request("d", output=[9, 9, 9], **params)
    assert Sampler()(logits, [blocked, done]).sampled_token_ids == [2, 0]


def test_logprobs_match_log_softmax_of_raw_logits():
    logits = make_logits(3, seed=4)
    requests = [
        make_request("a", temperature=1.0, logprobs=5, repetition_penalty=1.5, logit_bias={7: 5}),
        make_request("b", temperature=0.0),
        make_request("c", temperature=0.0, logprobs=0),
    ]
    output = Sampler()(logits, requests)
    reference = torch.log_softmax(logits.double(), dim=-1)
    assert output.logprobs[1] is None
    for row in (0, 2):
        chosen, top = output.logprobs[row]
        token_id = output.sampled_token_ids[row]
        assert chosen == pytest.approx(reference[row, token_id].item(), abs=1e-5)
        expected_ids = reference[row].argsort(descending=True)[: len(top)].tolist()
        assert [t for t, _ in top] == expected_ids
        for t, value in top:
            assert value == pytest.approx(reference[row, t].item(), abs=1e-5)
    assert len(output.logprobs[0][1]) == 5 and output.logprobs[2][1] == []


def test_mixed_batch_of_greedy_and_sampled_rows():
    logits = make_logits(6, seed=5)
    greedy = [make_request(f"g{i}", temperature=0.0) for i in range(3)]
    sampled = [make_request(f"s{i}", temperature=1.0, top_k=1) for i in range(3)]
    requests = [greedy[0], sampled[0], greedy[1], sampled[1], sampled[2], greedy[2]]
    # top_k=1 makes sampled rows deterministic too: every row must be its argmax.
    assert Sampler()(logits, requests).sampled_token_ids == logits.argmax(dim=-1).tolist()
    requests[1] = make_request("hot", temperature=2.0)
    outputs = [Sampler()(logits, requests).sampled_token_ids for _ in range(200)]
    assert len({tokens[1] for tokens in outputs}) > 1
    assert all(tokens[0] == logits[0].argmax().item() for tokens in outputs)
