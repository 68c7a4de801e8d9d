"""The proposer interface of speculative decoding: what a drafter returns for each request."""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from tokenforge.engine.request import Request


@dataclass
class Proposal:
    token_ids: list[int]  # the drafted continuation, 1..k tokens
    # [len(token_ids), vocab_size]: q_i, the distribution each drafted token was drawn from; None
    # when the draft is deterministic (n-gram lookup, or a greedy request), i.e. q is one-hot.
    draft_probs: torch.Tensor | None = None
    # Tokens the proposer computed for this request before drafting beyond what a round in a row
    # needs: a draft model's first pass over a prompt, or over the tokens decoded while drafting was
    # off. A one-time cost of (re)starting, not a cost per round: the timed switch-off leaves it out.
    num_extra_tokens: int = 0


class Proposer(Protocol):
    # Relative cost of drafting one token, in target forward passes (0 for n-gram lookup); the
    # adaptive policy weighs it against the expected number of accepted tokens.
    draft_cost: float

    def propose(self, requests: list["Request"], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        """Drafts up to num_tokens[request_id] tokens after each request's tokens (prompt and
        output); requests may be left out of the result (nothing to propose)."""
        ...

    def prepare(self, requests: list["Request"]) -> None:
        """Called once per request, at the step that computed its prompt: any per-request work
        worth doing before its first drafting round (a draft model's pass over the prompt)."""
        ...

    def release(self, live_request_ids: set[str]) -> None:
        """Drops any per-request state of requests not in live_request_ids."""
        ...
