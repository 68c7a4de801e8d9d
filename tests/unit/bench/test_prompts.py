"""The prompt sets are fixed: same name, count and seed give the same conversations."""

import pytest

from tokenforge.bench.prompts import PROMPT_SETS, make_prompt_set


@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_same_seed_same_conversations_other_seed_other_ones(name):
    first = make_prompt_set(name, 5, seed=3)
    assert first == make_prompt_set(name, 5, seed=3)
    assert first != make_prompt_set(name, 5, seed=4)
    assert len(first) == 5
    assert make_prompt_set(name, 3, seed=3) == first[:3]  # more prompts extend, never reshuffle


@pytest.mark.parametrize("name", list(PROMPT_SETS))
def test_no_two_conversations_alike(name):
    conversations = make_prompt_set(name, 16)
    users = [c[-1]["content"] for c in conversations]
    assert len(set(users)) == len(users)
    assert all(c[-1]["role"] == "user" for c in conversations)


def test_sizes_in_words():
    short_words = len(make_prompt_set("short", 1)[0][0]["content"].split())
    long_words = len(make_prompt_set("long", 1)[0][0]["content"].split())
    assert 60 <= short_words <= 90
    assert 1_250 <= long_words <= 1_400


def test_shared_system_prompt_is_the_same_for_every_request_and_seed():
    a, b = make_prompt_set("shared", 4, seed=0), make_prompt_set("shared", 2, seed=9)
    systems = {c[0]["content"] for c in a + b}
    assert len(systems) == 1 and all(c[0]["role"] == "system" for c in a)
    assert 800 <= len(next(iter(systems)).split()) <= 950


def test_unknown_set_is_refused():
    with pytest.raises(ValueError, match="unknown prompt set"):
        make_prompt_set("huge", 1)
