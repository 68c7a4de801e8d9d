"""Hybrid proposer: n-gram lookup where the text repeats itself, the draft model elsewhere.

Where a request's last min_match tokens occurred before (an edit copying its input, a quote, a
list), their continuation is a free draft, often right for long runs; elsewhere the draft model
proposes. A lookup costs microseconds, a draft token a fraction of a target step, so each request
each step tries the lookup first. It takes the lookup's draft unless its record says the draft
model yields more tokens per unit of cost: every lookup is scored against the tokens that came
after it, used or not (free to compute, so the record stays fresh while the draft model runs),
every draft model round by its accepted tokens. Exactness is the verifier's: both kinds of
proposal go through the same rejection sampling.

The draft model skips the rounds the lookup serves: its next pass catches up on their tokens in
one batched pass, a cost of the round (not a restart, which the controller leaves untimed).
"""

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenforge.spec.controller import PRIOR_ACCEPTANCE, expected_num_tokens, running_mean
from tokenforge.spec.draft_model import DraftModelProposer
from tokenforge.spec.ngram import find_continuation
from tokenforge.spec.proposer import Proposal

if TYPE_CHECKING:
    from tokenforge.engine.request import Request


EMA_WEIGHT = 0.3  # weight of each scored round in a request's running accepted counts


@dataclass
class _Track:
    """One request's record."""
    lookup_since: int | None = None  # its token count at its first lookup round since the draft model last ran
    lookup_accepted: float | None = None  # running mean of the lookup's accepted tokens a round (unused ones too)
    draft_accepted: float | None = None  # the same for the draft model's rounds
    pending: list[tuple[bool, int, list[int]]] = field(default_factory=list)  # (lookup?, at token count, drafts)

    def score(self, token_ids: list[int]) -> None:
        """Scores pending drafts against the tokens that followed them: an unused lookup waits for as
        many tokens as it drafted, or a mismatch (one verification may not produce that many)."""
        waiting = []
        for is_lookup, start, drafts in self.pending:
            after = token_ids[start:]
            accepted = next((i for i, (a, b) in enumerate(zip(drafts, after)) if a != b), None)
            if accepted is None:
                if not after or (len(after) < len(drafts) and is_lookup):
                    waiting.append((is_lookup, start, drafts))
                    continue
                accepted = min(len(drafts), len(after))
            if is_lookup:
                self.lookup_accepted = running_mean(self.lookup_accepted, accepted, EMA_WEIGHT)
            else:
                self.draft_accepted = running_mean(self.draft_accepted, accepted, EMA_WEIGHT)
        self.pending = waiting


class HybridProposer:
    def __init__(self, draft: DraftModelProposer, min_match: int, max_match: int, lookup_tokens: int,
                 verify_cost: float):
        """lookup_tokens: the lookup's drafts per round, whatever k the draft model is asked for (a
        lookup is free, only its verification costs; the controller cuts them to each request's cap).
        verify_cost: one more verified token, in target steps (the engine's measurement)."""
        self.draft = draft
        self.lookup_tokens = lookup_tokens
        self.verify_cost = verify_cost
        self.min_match, self.max_match = min_match, max(min_match, max_match)
        self.tracks: dict[str, _Track] = {}
        self.num_lookup_proposals = 0
        self.num_draft_proposals = 0

    @property
    def draft_cost(self) -> float:
        """The draft model's: the adaptive policy's k and switch-off assume the dearer proposer."""
        return self.draft.draft_cost

    def propose(self, requests: list["Request"], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        proposals, rest = {}, []
        for request in requests:
            track = self.tracks.setdefault(request.request_id, _Track())
            token_ids = request.all_token_ids
            track.score(token_ids)
            k = num_tokens[request.request_id]
            lookup = find_continuation(token_ids, self.min_match, self.max_match, max(self.lookup_tokens, k))
            if lookup:
                track.pending.append((True, len(token_ids), lookup))
            if lookup and self._lookup_pays(track, len(lookup), k):
                proposals[request.request_id] = Proposal(lookup)
                if track.lookup_since is None:
                    track.lookup_since = len(token_ids)
            else:
                rest.append(request)
        drafted = self.draft.propose(rest, num_tokens) if rest else {}
        for request in rest:
            track, proposal = self.tracks[request.request_id], drafted.get(request.request_id)
            if proposal is None:
                continue
            track.pending.append((False, request.num_tokens, proposal.token_ids))
            if track.lookup_since is not None:  # catching up on lookup rounds: a round's cost, not a restart
                lookup_tokens = request.num_tokens - track.lookup_since
                proposal.num_extra_tokens = max(0, proposal.num_extra_tokens - lookup_tokens)
            track.lookup_since = None
        self.num_lookup_proposals += len(proposals)
        self.num_draft_proposals += len(drafted)
        return proposals | drafted

    def _lookup_pays(self, track: _Track, num_lookup: int, k: int) -> bool:
        """Tokens per unit of cost, from the request's record: the lookup's against the draft model's
        (the lookup's untried: it wins; the draft model's: the controller's prior acceptance)."""
        if track.lookup_accepted is None:
            return True
        draft_accepted = track.draft_accepted
        if draft_accepted is None:
            draft_accepted = expected_num_tokens(PRIOR_ACCEPTANCE, k) - 1
        lookup_rate = (1 + track.lookup_accepted) / (1 + num_lookup * self.verify_cost)
        draft_rate = (1 + draft_accepted) / (1 + k * (self.draft.draft_cost + self.verify_cost))
        return lookup_rate >= draft_rate

    def prepare(self, requests: list["Request"]) -> None:
        self.draft.prepare(requests)

    def release(self, live_request_ids: set[str]) -> None:
        self.draft.release(live_request_ids)
        for request_id in [i for i in self.tracks if i not in live_request_ids]:
            del self.tracks[request_id]
