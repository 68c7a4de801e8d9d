"""Scheduler driven by hand: continuous batching, chunked prefill, preemption and stop conditions."""

from tokenforge.engine.request import FinishReason, RequestStatus
from tokenforge.engine.scheduler import SampledToken

from .conftest import EOS_TOKEN_ID, SAMPLED_TOKEN_ID, make_request, make_scheduler, run_step


def scheduled(output) -> dict[str, int]:
    return dict(output.num_scheduled_tokens)


def run_until_done(scheduler, max_steps: int = 100) -> int:
    for num_steps in range(1, max_steps + 1):
        run_step(scheduler)
        if not scheduler.has_unfinished_requests():
            return num_steps
    raise AssertionError("requests did not finish")


# --- batching ---------------------------------------------------------------------------------


def test_one_request_prefills_decodes_and_finishes():
    scheduler = make_scheduler(num_blocks=8)
    request = make_request("a", num_prompt_tokens=6, max_tokens=3)
    scheduler.add_request(request)

    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 6}
    assert output.block_ids == {"a": [0, 1]}
    assert updated == [request]
    assert request.status == RequestStatus.RUNNING
    assert request.num_computed_tokens == 6
    assert request.output_token_ids == [SAMPLED_TOKEN_ID]

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1}
    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 1}
    assert output.block_ids == {"a": [0, 1]}
    assert updated == [request]
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.finish_reason == FinishReason.LENGTH
    assert request.output_token_ids == [SAMPLED_TOKEN_ID] * 3
    assert not scheduler.has_unfinished_requests()
    assert scheduler.requests == {}
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    assert scheduler.schedule().is_empty


def test_requests_join_while_others_run_and_finished_ones_leave():
    scheduler = make_scheduler(num_blocks=8)
    a = make_request("a", num_prompt_tokens=4, max_tokens=4)
    b = make_request("b", prompt=[1, 2, 3, 4], max_tokens=2)
    scheduler.add_request(a)

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 4}

    scheduler.add_request(b)
    output, updated = run_step(scheduler)
    assert [r.request_id for r in output.scheduled_requests] == ["a", "b"]
    assert scheduled(output) == {"a": 1, "b": 4}
    assert output.block_ids == {"a": [0, 1], "b": [2]}
    assert updated == [a, b]

    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 1, "b": 1}
    assert b.status == RequestStatus.FINISHED_LENGTH
    assert scheduler.running == [a]

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1}
    assert a.num_output_tokens == 4
    assert a.is_finished
    assert not scheduler.has_unfinished_requests()
    assert scheduler.kv_cache_manager.num_free_blocks == 8


def test_max_num_seqs_caps_the_running_batch():
    scheduler = make_scheduler(max_num_seqs=2)
    a = make_request("a", prompt=[1, 2, 3, 4], max_tokens=1)
    b = make_request("b", prompt=[5, 6, 7, 8], max_tokens=3)
    c = make_request("c", prompt=[9, 10, 11, 12], max_tokens=1)
    for request in (a, b, c):
        scheduler.add_request(request)

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 4, "b": 4}
    assert a.is_finished
    assert list(scheduler.waiting) == [c]
    assert c.status == RequestStatus.WAITING

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"b": 1, "c": 4}
    assert scheduler.num_running == 1  # c finished after one token


# --- chunked prefill --------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_under_the_token_budget():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", num_prompt_tokens=10, max_tokens=5)
    b = make_request("b", prompt=[1, 2, 3, 4, 5], max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)

    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 8}  # the budget is spent; b waits
    assert updated == []  # a chunk short of the prompt's end samples nothing
    assert a.num_computed_tokens == 8
    assert a.output_token_ids == []
    assert list(scheduler.waiting) == [b]

    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 2, "b": 5}
    assert output.total_num_scheduled_tokens == 7
    assert updated == [a, b]

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1, "b": 1}


def test_a_new_request_gets_the_leftover_budget_as_a_partial_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    a = make_request("a", num_prompt_tokens=6, max_tokens=5)
    b = make_request("b", prompt=[1, 2, 3, 4, 5, 6], max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)

    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 6, "b": 2}
    assert updated == [a]
    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 1, "b": 4}
    assert updated == [a, b]
    assert b.num_computed_tokens == 6
    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1, "b": 1}


def test_running_requests_spend_the_budget_before_admissions():
    scheduler = make_scheduler(max_num_batched_tokens=3)
    requests = [make_request(f"r{i}", prompt=[i + 1], max_tokens=5) for i in range(4)]
    for request in requests:
        scheduler.add_request(request)

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"r0": 1, "r1": 1, "r2": 1}
    output, _ = run_step(scheduler)
    assert scheduled(output) == {"r0": 1, "r1": 1, "r2": 1}  # r3 still waits
    assert list(scheduler.waiting) == [requests[3]]


# --- preemption -------------------------------------------------------------------------------


def test_the_most_recently_admitted_request_is_preempted_and_later_completes():
    scheduler = make_scheduler(num_blocks=4)
    kv = scheduler.kv_cache_manager
    a = make_request("a", prompt=[1, 2, 3, 4], max_tokens=6)
    b = make_request("b", prompt=[5, 6, 7, 8], max_tokens=7)
    scheduler.add_request(a)
    scheduler.add_request(b)

    output, _ = run_step(scheduler)
    assert output.block_ids == {"a": [0], "b": [1]}
    output, _ = run_step(scheduler)
    assert output.block_ids == {"a": [0, 2], "b": [1, 3]}
    for _ in range(3):  # tokens 6..8 fit in the two blocks each holds
        output, _ = run_step(scheduler)
        assert scheduled(output) == {"a": 1, "b": 1}
    assert kv.num_free_blocks == 0
    assert b.num_computed_tokens == 8 and b.num_output_tokens == 5

    # a's 9th token needs a third block: b, admitted last, gives up its blocks (tail first).
    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1}
    assert output.preempted_request_ids == ["b"]
    assert output.block_ids == {"a": [0, 2, 3]}  # b's tail, the front of the free queue
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0
    assert b.num_preemptions == 1
    assert b.num_output_tokens == 5  # kept; recomputed with the prompt
    assert list(scheduler.waiting) == [b]
    assert kv.get_block_ids("b") == []
    assert a.is_finished  # its 6th token
    assert scheduler.running == []

    # b comes back: block 1 (its first block) is still cached, its tail was reused by a.
    output, _ = run_step(scheduler)
    assert scheduled(output) == {"b": 5}
    assert output.block_ids == {"b": [1, 3, 2]}
    assert b.status == RequestStatus.RUNNING
    assert b.num_cached_tokens == 0  # set at first admission only
    assert b.num_output_tokens == 6

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"b": 1}
    assert b.status == RequestStatus.FINISHED_LENGTH
    assert b.num_output_tokens == 7
    assert not scheduler.has_unfinished_requests()
    assert kv.num_free_blocks == 4


def test_a_request_preempts_itself_when_it_is_the_newest_and_waits_for_blocks():
    scheduler = make_scheduler(num_blocks=3)
    a = make_request("a", prompt=[1, 2, 3, 4], max_tokens=3)
    b = make_request("b", prompt=[5, 6, 7, 8], max_tokens=2)
    scheduler.add_request(a)
    scheduler.add_request(b)
    run_step(scheduler)  # a: [0], b: [1]

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1}
    assert output.block_ids == {"a": [0, 2]}
    assert output.preempted_request_ids == ["b"]
    assert b.status == RequestStatus.PREEMPTED
    assert list(scheduler.waiting) == [b]
    assert scheduler.kv_cache_manager.num_free_blocks == 1

    # b's cached first block is free but b needs one more; it waits for a to finish.
    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1}
    assert output.preempted_request_ids == []
    assert a.is_finished

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"b": 1}  # 4 of its 5 tokens come from the cache
    assert output.block_ids == {"b": [1, 2]}
    assert b.num_computed_tokens == 5
    assert b.is_finished


def test_no_request_is_admitted_in_a_step_that_preempted():
    # Without caching and with a small budget, b would fit as a 4-token chunk right after its
    # preemption; admitting it would only thrash.
    scheduler = make_scheduler(num_blocks=3, max_num_batched_tokens=5, enable_caching=False)
    a = make_request("a", prompt=[1, 2, 3, 4], max_tokens=6)
    b = make_request("b", prompt=[9], max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)
    output, _ = run_step(scheduler)
    assert output.block_ids == {"a": [0], "b": [1]}
    for _ in range(3):
        run_step(scheduler)
    assert b.num_tokens == 5 and b.num_computed_tokens == 4

    output, _ = run_step(scheduler)  # b's 5th token needs a block; none is free
    assert scheduled(output) == {"a": 1}
    assert output.preempted_request_ids == ["b"]
    assert list(scheduler.waiting) == [b]

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"a": 1}
    assert output.block_ids == {"a": [0, 2, 1]}
    assert a.is_finished

    output, _ = run_step(scheduler)
    assert scheduled(output) == {"b": 5}
    assert output.block_ids == {"b": [1, 2]}
    assert b.is_finished
    assert b.output_token_ids == [SAMPLED_TOKEN_ID] * 5


def test_preempted_request_goes_to_the_front_of_the_waiting_queue():
    scheduler = make_scheduler(num_blocks=2, max_num_seqs=2)
    a = make_request("a", prompt=[1, 2, 3, 4], max_tokens=2)
    b = make_request("b", prompt=[5, 6, 7, 8], max_tokens=2)
    c = make_request("c", prompt=[9, 10, 11, 12], max_tokens=1)
    for request in (a, b, c):
        scheduler.add_request(request)
    run_step(scheduler)  # a and b run; max_num_seqs keeps c waiting
    output, _ = run_step(scheduler)
    assert output.preempted_request_ids == ["b"]
    assert list(scheduler.waiting) == [b, c]
    assert run_until_done(scheduler) > 0
    assert [r.status for r in (a, b, c)] == [RequestStatus.FINISHED_LENGTH] * 3


# --- stop conditions --------------------------------------------------------------------------


def run_one(token_ids: list[int], **params):
    """Runs one request, sampling token_ids in turn until it finishes or they run out."""
    scheduler = make_scheduler()
    request = make_request("a", num_prompt_tokens=4, **params)
    scheduler.add_request(request)
    for token_id in token_ids:
        run_step(scheduler, {"a": token_id})
        if request.is_finished:
            break
    return scheduler, request


def test_eos_stops_the_request():
    scheduler, request = run_one([5, EOS_TOKEN_ID, 6], max_tokens=10)
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.finish_reason == FinishReason.STOP
    assert request.stop_reason is None
    assert request.output_token_ids == [5, EOS_TOKEN_ID]
    assert scheduler.kv_cache_manager.num_free_blocks == 16


def test_ignore_eos_keeps_going_until_max_tokens():
    _, request = run_one([EOS_TOKEN_ID] * 5, max_tokens=3, ignore_eos=True)
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == [EOS_TOKEN_ID] * 3


def test_request_without_an_eos_token_is_not_stopped_by_it():
    scheduler = make_scheduler()
    request = make_request("a", eos_token_id=None, max_tokens=2)
    scheduler.add_request(request)
    run_step(scheduler, {"a": EOS_TOKEN_ID})
    assert not request.is_finished


def test_stop_token_ids_stop_and_record_the_stop_reason():
    _, request = run_one([5, 9, 6], max_tokens=10, stop_token_ids=[9, 11])
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.stop_reason == 9
    assert request.output_token_ids == [5, 9]


def test_max_tokens_finishes_with_length():
    _, request = run_one([5] * 10, max_tokens=4)
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.output_token_ids == [5] * 4


def test_eos_on_the_last_allowed_token_is_a_stop():
    _, request = run_one([5, EOS_TOKEN_ID], max_tokens=2)
    assert request.status == RequestStatus.FINISHED_STOPPED


def test_max_model_len_finishes_with_length():
    scheduler = make_scheduler(max_model_len=7)
    request = make_request("a", num_prompt_tokens=4, max_tokens=None)
    scheduler.add_request(request)
    run_until_done(scheduler)
    assert request.status == RequestStatus.FINISHED_LENGTH
    assert request.num_tokens == 7
    assert request.num_output_tokens == 3


def test_min_tokens_delays_eos_and_stop_tokens():
    _, request = run_one([EOS_TOKEN_ID, 9, EOS_TOKEN_ID, 5], max_tokens=10, min_tokens=3, stop_token_ids=[9])
    assert request.status == RequestStatus.FINISHED_STOPPED
    assert request.output_token_ids == [EOS_TOKEN_ID, 9, EOS_TOKEN_ID]  # stops at the 3rd token
    assert request.stop_reason is None

    _, request = run_one([EOS_TOKEN_ID, 5, 9], max_tokens=10, min_tokens=2, stop_token_ids=[9])
    assert request.output_token_ids == [EOS_TOKEN_ID, 5, 9]
    assert request.stop_reason == 9


def test_update_records_logprobs_when_given():
    scheduler = make_scheduler()
    request = make_request("a", max_tokens=2, logprobs=1)
    scheduler.add_request(request)
    output = scheduler.schedule()
    scheduler.update(output, {"a": [SampledToken(5, (-0.5, [(5, -0.5)]))]})
    assert request.output_logprobs == [(5, -0.5, [(5, -0.5)])]


# --- finishing and aborting -------------------------------------------------------------------


def test_abort_of_a_running_request_frees_its_blocks():
    scheduler = make_scheduler(num_blocks=8)
    a = make_request("a", num_prompt_tokens=9, max_tokens=5)
    scheduler.add_request(a)
    run_step(scheduler)
    assert scheduler.kv_cache_manager.num_free_blocks == 5

    assert scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    assert a.status == RequestStatus.FINISHED_ABORTED
    assert a.finish_reason == FinishReason.ABORT
    assert scheduler.running == []
    assert scheduler.kv_cache_manager.num_free_blocks == 8
    assert "a" not in scheduler.kv_cache_manager.req_to_hashes
    assert not scheduler.has_unfinished_requests()


def test_abort_of_waiting_and_unknown_requests():
    scheduler = make_scheduler()
    a = make_request("a")
    scheduler.add_request(a)
    assert scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED) is a
    assert scheduler.num_waiting == 0
    assert scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED) is None
    assert scheduler.finish_request("nope", RequestStatus.FINISHED_ABORTED) is None


def test_abort_of_a_preempted_request_removes_it_from_waiting():
    scheduler = make_scheduler(num_blocks=3)
    scheduler.add_request(make_request("a", prompt=[1, 2, 3, 4], max_tokens=3))
    b = make_request("b", prompt=[5, 6, 7, 8], max_tokens=3)
    scheduler.add_request(b)
    run_step(scheduler)
    output, _ = run_step(scheduler)
    assert output.preempted_request_ids == ["b"]
    assert scheduler.finish_request("b", RequestStatus.FINISHED_ABORTED) is b
    assert list(scheduler.waiting) == []


def test_abort_between_schedule_and_update_skips_the_request():
    scheduler = make_scheduler(num_blocks=8)
    a = make_request("a", prompt=[1, 2, 3, 4], max_tokens=5)
    b = make_request("b", prompt=[5, 6, 7, 8], max_tokens=5)
    scheduler.add_request(a)
    scheduler.add_request(b)
    output = scheduler.schedule()
    scheduler.finish_request("a", RequestStatus.FINISHED_ABORTED)
    updated = scheduler.update(output, {"a": [SampledToken(5)], "b": [SampledToken(5)]})
    assert updated == [b]
    assert a.output_token_ids == []
    assert scheduler.kv_cache_manager.get_block_ids("a") == []


# --- prefix cache at admission ----------------------------------------------------------------


def test_admission_serves_a_shared_prefix_from_the_cache():
    scheduler = make_scheduler(num_blocks=8)
    shared = list(range(100, 108))
    a = make_request("a", prompt=shared + [1, 2], max_tokens=5)
    scheduler.add_request(a)
    run_step(scheduler)
    assert a.num_cached_tokens == 0

    b = make_request("b", prompt=shared + [3, 4, 5], max_tokens=5)
    scheduler.add_request(b)
    output, updated = run_step(scheduler)
    assert scheduled(output) == {"a": 1, "b": 3}
    assert output.block_ids == {"a": [0, 1, 2], "b": [0, 1, 3]}
    assert b.num_cached_tokens == 8
    assert b.num_computed_tokens == 11
    assert updated == [a, b]
    kv = scheduler.kv_cache_manager
    assert kv.num_prefix_queried_tokens == 10 + 11
    assert kv.num_prefix_hit_tokens == 8


def test_admission_without_prefix_caching_caches_nothing():
    scheduler = make_scheduler(enable_caching=False)
    shared = list(range(100, 108))
    scheduler.add_request(make_request("a", prompt=shared + [1], max_tokens=5))
    run_step(scheduler)
    b = make_request("b", prompt=shared + [2], max_tokens=5)
    scheduler.add_request(b)
    output, _ = run_step(scheduler)
    assert scheduled(output)["b"] == 9
    assert b.num_cached_tokens == 0


def test_a_request_waiting_for_blocks_is_counted_once_in_prefix_statistics():
    scheduler = make_scheduler(num_blocks=2)
    kv = scheduler.kv_cache_manager
    a = make_request("a", prompt=[1, 2, 3, 4, 5], max_tokens=3)
    b = make_request("b", prompt=[6, 7, 8], max_tokens=1)
    scheduler.add_request(a)
    scheduler.add_request(b)
    for _ in range(3):  # a holds both blocks; b cannot be admitted
        output, _ = run_step(scheduler)
        assert "b" not in output.num_scheduled_tokens
    assert a.is_finished
    output, _ = run_step(scheduler)
    assert scheduled(output) == {"b": 3}
    assert kv.num_prefix_queried_tokens == 5 + 3
