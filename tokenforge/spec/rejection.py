"""Verification of drafted tokens: greedy prefix matching and exact rejection sampling (pure).

Speculative sampling (Leviathan et al. 2023; Chen et al. 2023). A draft proposes d_1..d_k, d_i
drawn from q_i; one target pass gives p_1..p_{k+1}. For i = 1..k: accept d_i with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection draw the token from the residual
norm(max(0, p_i - q_i)) and stop; if all k are accepted, draw a bonus token from p_{k+1}.

Why the output is distributed as p_i exactly: a token x comes out of position i either as the
accepted draft, with probability q(x) min(1, p(x)/q(x)) = min(q(x), p(x)), or from the residual
after a rejection. The rejection probability is 1 - sum_x min(p(x), q(x)) = sum_x max(0, p(x) - q(x)),
which is exactly the residual's normaliser, so that path contributes max(0, p(x) - q(x)).
min(p, q) + max(0, p - q) = p. A deterministic proposer (n-gram lookup) is q = one-hot(d): accept
with probability p(d), else draw from p with d removed.

Every call takes exactly k + 1 uniform numbers from the request's generator, whatever is
accepted, so a seeded request's draws do not depend on anything but its own tokens.
"""

import torch


def verify_greedy(draft_token_ids: list[int], target_token_ids: list[int]) -> list[int]:
    """Greedy: target_token_ids [k + 1] are the target's argmax after each prefix. Accept the
    longest prefix of drafts equal to the target's choices, then the target's own next token."""
    assert len(target_token_ids) == len(draft_token_ids) + 1
    out = []
    for draft_id, target_id in zip(draft_token_ids, target_token_ids):
        out.append(target_id)
        if draft_id != target_id:
            return out
    out.append(target_token_ids[-1])
    return out


def draw(probs: torch.Tensor, uniform: float) -> int:
    """Inverse CDF: the first position whose cumulative probability reaches (1 - u) * total.
    probs [V] need not sum to 1; a zero-probability position is never drawn (for u in [0, 1))."""
    cdf = probs.cumsum(dim=-1)
    target = (1.0 - uniform) * cdf[-1]
    index = int(torch.searchsorted(cdf, target.unsqueeze(0)).item())
    return min(index, probs.shape[-1] - 1)


def residual_probs(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_token_id: int) -> torch.Tensor:
    """max(0, p - q), unnormalised, [V]. With q = None (one-hot on the draft) that is p without
    the drafted token. If it is all zero (p == q), rejection had probability 0: fall back to p."""
    if draft_probs is None:
        residual = target_probs.clone()
        residual[draft_token_id] = 0.0
    else:
        residual = (target_probs - draft_probs).clamp_(min=0.0)
    return residual if residual.sum() > 0 else target_probs


def rejection_sample(
    draft_token_ids: list[int],
    target_probs: torch.Tensor,  # [k + 1, V]: the target's distribution after each prefix
    draft_probs: torch.Tensor | None,  # [k, V]: q_i; None when the proposal was deterministic
    generator: torch.Generator | None = None,
) -> list[int]:
    """The accepted drafts, then one token from the residual or the bonus position: 1..k+1 ids."""
    num_draft = len(draft_token_ids)
    assert target_probs.shape[0] == num_draft + 1
    uniforms = torch.rand(num_draft + 1, generator=generator).tolist()  # k tests + the final draw
    rows = torch.arange(num_draft, device=target_probs.device)
    ids = torch.tensor(draft_token_ids, dtype=torch.long, device=target_probs.device)
    p_draft = target_probs[rows, ids].tolist()  # p_i(d_i)
    q_draft = [1.0] * num_draft if draft_probs is None else draft_probs[rows, ids].tolist()  # q_i(d_i)
    for i in range(num_draft):
        # u < p/q without the division: a q of 0 (never drawn) with p of 0 is rejected.
        if uniforms[i] * q_draft[i] >= p_draft[i]:
            q_row = None if draft_probs is None else draft_probs[i]
            residual = residual_probs(target_probs[i], q_row, draft_token_ids[i])
            return draft_token_ids[:i] + [draw(residual, uniforms[num_draft])]
    return draft_token_ids + [draw(target_probs[num_draft], uniforms[num_draft])]
