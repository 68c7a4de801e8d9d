"""HybridProposer's choice between the lookup and the draft model, from each request's record."""

from tokenforge.engine.request import Request
from tokenforge.sampling_params import SamplingParams
from tokenforge.spec.hybrid import HybridProposer
from tokenforge.spec.ngram import find_continuation
from tokenforge.spec.proposer import Proposal

PATTERN = [11, 12, 13, 14, 15, 16]


class FakeDraft:
    """Proposes 1000 + n, 1001 + n, ... (n: the request's token count) as asked; counts its rounds."""
    draft_cost = 0.3

    def __init__(self):
        self.num_rounds = 0

    def propose(self, requests, num_tokens):
        self.num_rounds += 1
        return {r.request_id: Proposal(draft_tokens(r.num_tokens, num_tokens[r.request_id])) for r in requests}


def draft_tokens(num_tokens: int, k: int) -> list[int]:
    return list(range(1000 + num_tokens, 1000 + num_tokens + k))

    def prepare(self, requests):
        pass

    def release(self, live_request_ids):
        pass


def make_request(token_ids: list[int]) -> Request:
    request = Request("r", token_ids[:3], SamplingParams(max_tokens=1000))
    request.output_token_ids = list(token_ids[3:])
    return request


def make_hybrid() -> tuple[HybridProposer, FakeDraft]:
    draft = FakeDraft()
    return HybridProposer(draft, min_match=3, max_match=4, lookup_tokens=6, verify_cost=0.1), draft


def test_the_lookup_drafts_where_the_text_repeats_the_draft_model_elsewhere():
    hybrid, draft = make_hybrid()
    repeating = make_request(PATTERN + PATTERN[:3])
    assert hybrid.propose([repeating], {"r": 2})["r"].token_ids == PATTERN[3:] + PATTERN[:3]  # 6, not the asked 2
    assert draft.num_rounds == 0
    assert hybrid.propose([make_request([1, 2, 3, 4, 5])], {"r": 2})["r"].token_ids == [1005, 1006]
    assert draft.num_rounds == 1


def test_a_lookup_that_keeps_missing_gives_way_and_its_unused_drafts_keep_being_scored():
    """The text keeps repeating a passage's start, then goes elsewhere (where the draft model is
    right): the lookup's drafts miss, so the draft model takes over; the lookup is still scored each
    step, and when the text turns into a copy its record wins the rounds back."""
    hybrid, draft = make_hybrid()
    tokens = PATTERN + PATTERN[:3]
    for _ in range(6):  # a round: the draft model's two tokens and the target's own, then the passage's start again
        proposal = hybrid.propose([make_request(tokens)], {"r": 2})["r"]
        tokens = tokens + draft_tokens(len(tokens), 3) + PATTERN[:3]
    track = hybrid.tracks["r"]
    assert track.lookup_accepted < 0.5 and track.draft_accepted > 1.5
    assert proposal.token_ids == draft_tokens(len(tokens) - 6, 2)  # the draft model's: the lookup lost
    rounds = draft.num_rounds
    for _ in range(8):  # now the text copies what the lookup proposes (six drafts and one more)
        proposal = hybrid.propose([make_request(tokens)], {"r": 2})["r"]
        tokens = tokens + find_continuation(tokens, 3, 4, 7)
    assert track.lookup_accepted > 4 and len(proposal.token_ids) == 6  # scored while unused: it is back
    assert draft.num_rounds < rounds + 8
