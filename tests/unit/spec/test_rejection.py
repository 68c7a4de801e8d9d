"""Rejection sampling on hand-made p and q: the exact maths, then the sampler's empirical output."""

import pytest
import torch

from tokenforge.spec.rejection import draw, rejection_sample, residual_probs, verify_greedy

P = torch.tensor([0.5, 0.2, 0.2, 0.1, 0.0])
Q = torch.tensor([0.1, 0.6, 0.1, 0.0, 0.2])


def test_greedy_accepts_the_matching_prefix_then_the_targets_token():
    assert verify_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert verify_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert verify_greedy([5, 6, 7], [4, 6, 7, 8]) == [4]
    assert verify_greedy([], [3]) == [3]


def test_accepted_mass_plus_residual_is_exactly_p():
    """P(x first) = q(x) min(1, p(x)/q(x)) + P(reject) * residual(x) / |residual| = p(x)."""
    accept = torch.where(Q > 0, Q * torch.clamp(P / Q, max=1.0), torch.zeros_like(Q))
    residual = residual_probs(P, Q, draft_token_id=0)  # the token does not matter with a q
    p_reject = 1.0 - accept.sum()
    assert torch.allclose(residual.sum(), p_reject)
    assert torch.allclose(accept + p_reject * residual / residual.sum(), P)


def test_one_hot_draft_residual_is_p_without_the_draft():
    residual = residual_probs(P, None, draft_token_id=0)
    assert residual.tolist() == pytest.approx([0.0, 0.2, 0.2, 0.1, 0.0])
    # accepted with p(d) = 0.5, else the renormalised residual: again p exactly.
    assert torch.allclose(P[0] * torch.nn.functional.one_hot(torch.tensor(0), 5) + (1 - P[0]) * residual / residual.sum(), P)


def test_residual_falls_back_to_p_when_p_equals_q():
    assert torch.equal(residual_probs(P, P.clone(), draft_token_id=0), P)


def test_draw_never_picks_a_zero_probability_token():
    probs = torch.tensor([0.0, 0.3, 0.0, 0.7, 0.0])
    assert draw(probs, 0.0) == 3  # (1 - u) * total = total: the last non-zero position
    assert draw(probs, 0.99) == 1
    assert {draw(probs, u / 100) for u in range(100)} == {1, 3}


def test_certain_draft_is_always_accepted_and_impossible_draft_never():
    p = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert rejection_sample([1], p, None) == [1, 2]
    p = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    assert rejection_sample([1], p, None) == [2]


def test_takes_k_plus_one_uniforms_whatever_is_accepted():
    p = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(7)
    rejection_sample([1, 1], p, None, generator)  # rejected at once
    expected = torch.Generator().manual_seed(7)
    torch.rand(3, generator=expected)
    assert torch.rand(1, generator=generator).item() == torch.rand(1, generator=expected).item()


@pytest.mark.parametrize("with_q", [True, False])
def test_empirical_distribution_of_two_tokens_matches_the_target(with_q):
    """k = 2 drafts drawn from q; the first two output tokens must follow p_1 and p_2."""
    torch.manual_seed(0)
    vocab = 5
    p = torch.stack([P, torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1]), torch.tensor([0.2] * 5)])  # [3, V]
    q = torch.stack([Q, torch.tensor([0.3, 0.3, 0.1, 0.2, 0.1])])  # [2, V]
    generator = torch.Generator().manual_seed(1234)
    num_samples = 10_000
    counts = torch.zeros(2, vocab)
    for _ in range(num_samples):
        if with_q:
            drafts = [draw(q[i], torch.rand(1, generator=generator).item()) for i in range(2)]
            out = rejection_sample(drafts, p, q, generator)
        else:
            drafts = [1, 2]  # a fixed (n-gram) proposal: q is one-hot
            out = rejection_sample(drafts, p, None, generator)
        counts[0, out[0]] += 1
        if len(out) > 1:
            counts[1, out[1]] += 1
    # The first token's marginal is p_1. The second, given the first was an accepted draft, is p_2.
    freq = counts[0] / num_samples
    sigma = (P * (1 - P) / num_samples).sqrt()
    assert torch.all((freq - P).abs() <= 5 * sigma + 1e-9), (freq, P)
    second = counts[1] / counts[1].sum()
    sigma = (p[1] * (1 - p[1]) / counts[1].sum()).sqrt()
    assert torch.all((second - p[1]).abs() <= 5 * sigma + 1e-9), (second, p[1])


def test_always_accepting_would_fail_the_same_check():
    """The empirical check above can fail: the draft's own distribution is far from p."""
    num_samples = 10_000
    freq = Q  # what accepting every draft would produce
    sigma = (P * (1 - P) / num_samples).sqrt()
    assert not torch.all((freq - P).abs() <= 5 * sigma + 1e-9)
