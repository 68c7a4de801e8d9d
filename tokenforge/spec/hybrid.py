"""Hybrid proposer: n-gram lookup where the text repeats itself, the draft model elsewhere.

Where a request's last min_match tokens occurred before (an edit copying its input, a quote, a
list), their continuation is a free draft, often right for long runs; elsewhere the draft model
proposes. A lookup costs microseconds, a draft token a fraction of a target step, so each request
each step tries the lookup first and asks the draft only when it finds nothing. Exactness is the
verifier's: both kinds of proposal go through the same rejection sampling.

The draft model skips the rounds the lookup serves: its next pass catches up on their tokens in
one batched pass, a cost of the round (not a restart, which the controller leaves untimed).
"""

from typing import TYPE_CHECKING

from tokenforge.spec.draft_model import DraftModelProposer
from tokenforge.spec.ngram import NgramProposer
from tokenforge.spec.proposer import Proposal

if TYPE_CHECKING:
    from tokenforge.engine.request import Request


class HybridProposer:
    def __init__(self, draft: DraftModelProposer, min_match: int, max_match: int, lookup_tokens: int):
        """lookup_tokens: the lookup's drafts per round, whatever k the draft model is asked for (a
        lookup is free, only its verification costs; the controller cuts them to each request's cap)."""
        self.draft = draft
        self.lookup_tokens = lookup_tokens
        self.lookup = NgramProposer(min_match, max(min_match, max_match))
        # request_id -> the request's token count at its first lookup round since the draft last ran
        self.lookup_since: dict[str, int] = {}
        self.num_lookup_proposals = 0
        self.num_draft_proposals = 0

    @property
    def draft_cost(self) -> float:
        """The draft model's: the adaptive policy's k and switch-off assume the dearer proposer."""
        return self.draft.draft_cost

    def propose(self, requests: list["Request"], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        by_id = {r.request_id: r for r in requests}
        proposals = self.lookup.propose(requests, {r.request_id: max(self.lookup_tokens, num_tokens[r.request_id])
                                                   for r in requests})
        for request_id in proposals:
            self.lookup_since.setdefault(request_id, by_id[request_id].num_tokens)
        rest = [r for r in requests if r.request_id not in proposals]
        drafted = self.draft.propose(rest, num_tokens) if rest else {}
        for request in rest:
            since = self.lookup_since.pop(request.request_id, None)
            proposal = drafted.get(request.request_id)
            if since is not None and proposal is not None:  # catching up on lookup rounds: a round's cost
                proposal.num_extra_tokens = max(0, proposal.num_extra_tokens - (request.num_tokens - since))
        self.num_lookup_proposals += len(proposals)
        self.num_draft_proposals += len(drafted)
        return proposals | drafted

    def prepare(self, requests: list["Request"]) -> None:
        self.draft.prepare(requests)

    def release(self, live_request_ids: set[str]) -> None:
        self.draft.release(live_request_ids)
        for request_id in [i for i in self.lookup_since if i not in live_request_ids]:
            del self.lookup_since[request_id]
