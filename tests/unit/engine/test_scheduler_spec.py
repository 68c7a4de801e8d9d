"""Scheduler with draft tokens: a request's last token and its drafts run in one step; the
rejected drafts' blocks are rolled back and the accepted tokens go through the stop checks."""

from tokenforge.engine.request import RequestStatus
from tokenforge.engine.scheduler import SampledToken

from .conftest import EOS_TOKEN_ID, make_request, make_scheduler, run_step


def decoding(scheduler, request):
    """Admits the request and runs its prefill: it then decodes (all tokens computed but one)."""
    scheduler.add_request(request)
    run_step(scheduler)
    assert request.num_computed_tokens == request.num_tokens - 1
    return request


def test_drafts_are_scheduled_after_the_last_token_and_rejected_ones_rolled_back():
    scheduler = make_scheduler(num_blocks=8)  # blocks of 4 tokens
    request = decoding(scheduler, make_request("a", num_prompt_tokens=4, max_tokens=20))  # 5 tokens, 2 blocks
    request.spec_token_ids = [11, 12, 13, 14]
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"a": 5}
    assert output.spec_token_ids == {"a": [11, 12, 13, 14]}
    assert len(output.block_ids["a"]) == 3  # 9 slots: positions 0..8
    # One draft accepted, then the target's own token.
    updated = scheduler.update(output, {"a": [SampledToken(11), SampledToken(30)]})
    assert updated == [request]
    assert request.output_token_ids[-2:] == [11, 30]
    assert request.num_computed_tokens == 6  # the old last token and the accepted draft
    assert request.num_tokens == 7
    assert request.spec_token_ids == []
    assert len(scheduler.kv_cache_manager.get_block_ids("a")) == 2  # the block for rejected slots is free
    assert scheduler.kv_cache_manager.num_free_blocks == 6


def test_all_drafts_accepted():
    scheduler = make_scheduler(num_blocks=8)
    request = decoding(scheduler, make_request("a", num_prompt_tokens=4, max_tokens=20))
    request.spec_token_ids = [11, 12]
    output = scheduler.schedule()
    scheduler.update(output, {"a": [SampledToken(11), SampledToken(12), SampledToken(13)]})
    assert request.output_token_ids[-3:] == [11, 12, 13]
    assert request.num_computed_tokens == request.num_tokens - 1 == 7


def test_a_stop_inside_the_accepted_tokens_drops_the_rest():
    scheduler = make_scheduler(num_blocks=8)
    request = decoding(scheduler, make_request("a", num_prompt_tokens=4, max_tokens=20))
    request.spec_token_ids = [11, EOS_TOKEN_ID, 13]
    output = scheduler.schedule()
    scheduler.update(output, {"a": [SampledToken(11), SampledToken(EOS_TOKEN_ID), SampledToken(13),
                                    SampledToken(14)]})
    assert request.output_token_ids[-2:] == [11, EOS_TOKEN_ID]
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert scheduler.kv_cache_manager.num_free_blocks == 8


def test_max_tokens_inside_the_accepted_tokens_drops_the_rest():
    scheduler = make_scheduler(num_blocks=8)
    request = decoding(scheduler, make_request("a", num_prompt_tokens=4, max_tokens=3))
    request.spec_token_ids = [11, 12, 13]
    output = scheduler.schedule()
    scheduler.update(output, {"a": [SampledToken(11), SampledToken(12), SampledToken(13), SampledToken(14)]})
    assert request.num_output_tokens == 3
    assert request.status == RequestStatus.FINISHED_LENGTH


def test_the_token_budget_cuts_drafts_first():
    scheduler = make_scheduler(num_blocks=8, max_num_batched_tokens=3)
    request = decoding(scheduler, make_request("a", num_prompt_tokens=3, max_tokens=20))
    request.spec_token_ids = [11, 12, 13, 14]
    output = scheduler.schedule()
    assert output.num_scheduled_tokens == {"a": 3}
    assert output.spec_token_ids == {"a": [11, 12]}


def test_preemption_forgets_the_drafts():
    scheduler = make_scheduler(num_blocks=2)  # 8 slots
    a = decoding(scheduler, make_request("a", num_prompt_tokens=3, max_tokens=20))
    b = decoding(scheduler, make_request("b", num_prompt_tokens=3, max_tokens=20))
    b.spec_token_ids = [11, 12, 13]  # b needs a second block: none is free, so b preempts itself
    output = scheduler.schedule()
    assert output.preempted_request_ids == ["b"]
    assert b.spec_token_ids == [] and b.status == RequestStatus.PREEMPTED
    assert a.status == RequestStatus.RUNNING
