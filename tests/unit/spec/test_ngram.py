"""N-gram lookup: longest suffix first, latest occurrence first, token-aligned matches only."""

from tokenforge.engine.request import Request
from tokenforge.sampling_params import SamplingParams
from tokenforge.spec.ngram import NgramProposer, find_continuation


def test_continues_the_longest_matching_suffix():
    # suffix [1, 2, 3] occurred at the start, followed by 4, 5
    assert find_continuation([1, 2, 3, 4, 5, 9, 2, 3, 7, 1, 2, 3], 1, 3, 2) == [4, 5]
    # only [3] matches at n=1: its latest earlier occurrence is followed by 7
    assert find_continuation([1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 3], 1, 3, 3) == [7, 8, 3]


def test_prefers_the_latest_occurrence():
    assert find_continuation([5, 1, 5, 2, 5], 1, 1, 1) == [2]


def test_min_n_and_no_match():
    assert find_continuation([1, 2, 3, 4], 1, 4, 3) == []
    assert find_continuation([1, 2, 9, 2], 2, 4, 3) == []  # [9, 2] never occurred before
    assert find_continuation([1, 2, 9, 2], 1, 4, 3) == [9, 2, 9]


def test_the_continuation_may_run_into_the_suffix_itself():
    assert find_continuation([7, 7, 7, 7], 1, 2, 5) == [7] * 5
    assert find_continuation([1, 2, 3, 1, 2, 3, 1], 1, 4, 5) == [2, 3, 1, 2, 3]


def test_matches_are_token_aligned():
    # 256 packs as bytes 00 01 00 00: a byte-level search could align [1, 0] inside it.
    ids = [256, 0, 0, 1, 0]
    assert find_continuation(ids, 2, 2, 2) == []
    assert find_continuation([70000, 3, 70000], 1, 1, 1) == [3]


def test_zero_tokens_or_short_sequences_propose_nothing():
    assert find_continuation([1, 1], 1, 1, 0) == []
    assert find_continuation([1], 1, 1, 4) == []


def test_proposer_drafts_per_request_and_skips_requests_without_a_match():
    a = Request("a", [1, 2, 3, 1, 2], SamplingParams())
    b = Request("b", [4, 5, 6], SamplingParams())
    proposals = NgramProposer(1, 3).propose([a, b], {"a": 2, "b": 2})
    assert list(proposals) == ["a"]
    assert proposals["a"].token_ids == [3, 1]
    assert proposals["a"].draft_probs is None
