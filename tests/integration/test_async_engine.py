"""AsyncEngine on the real model: concurrent streams, abort frees blocks, a dead loop fails fast."""

import asyncio
import threading

import pytest

from tests.integration.helpers import make_engine_core, make_llm
from tokenforge.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES, AsyncEngine
from tokenforge.errors import EngineDeadError, EngineStepError, InvalidRequestError, QueueFullError
from tokenforge.sampling_params import SamplingParams

PROMPTS = ["The capital of France is", "def add(a, b):", "Once upon a time", "Water boils at"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


async def collect(engine: AsyncEngine, request_id: str, token_ids: list[int], params=GREEDY):
    deltas = [out async for out in engine.generate(request_id, token_ids, params)]
    return deltas


def test_concurrent_streams_match_offline(smollm2_loaded):
    tokenizer = smollm2_loaded[0].tokenizer
    token_lists = [tokenizer.encode(p) for p in PROMPTS]
    expected = make_llm(smollm2_loaded).generate(token_lists, GREEDY)
    engine = AsyncEngine(make_engine_core(smollm2_loaded)).start()
    try:
        async def main():
            return await asyncio.gather(*(collect(engine, f"r{i}", t) for i, t in enumerate(token_lists)))

        results = asyncio.run(main())
    finally:
        engine.shutdown()
    for deltas, want in zip(results, expected):
        assert [t for d in deltas for t in d.new_token_ids] == want.outputs[0].token_ids
        assert "".join(d.new_text for d in deltas) == want.outputs[0].text
        assert deltas[-1].finished and deltas[-1].finish_reason.value == "length"
        assert all(not d.finished for d in deltas[:-1])


def test_leaving_a_stream_aborts_and_frees_blocks(smollm2_loaded):
    core = make_engine_core(smollm2_loaded)
    engine = AsyncEngine(core).start()
    token_ids = smollm2_loaded[0].tokenizer.encode("Tell me a long story about a dragon.")
    long_params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)
    try:
        async def main():
            seen = 0
            async for _ in engine.generate("leaver", token_ids, long_params):
                seen += 1
                if seen == 3:
                    break  # the client goes away
            for _ in range(100):
                if not core.has_unfinished_requests() and engine.num_unfinished() == 0:
                    break
                await asyncio.sleep(0.05)
            return seen

        assert asyncio.run(main()) == 3
        assert not core.has_unfinished_requests()
        assert core.kv_cache_manager.num_free_blocks == core.kv_cache_manager.block_pool.num_blocks
    finally:
        engine.shutdown()


def _fail_steps(core, failing: set[int] | None) -> dict:
    """Makes the forward raise on the given step numbers (1-based), or on every step from now on (None)."""
    real_execute = core.runner.execute
    calls = {"n": 0}

    def failing_execute(scheduled):
        calls["n"] += 1
        if failing is None or calls["n"] in failing:
            raise RuntimeError("injected forward failure")
        return real_execute(scheduled)

    core.runner.execute = failing_execute
    return calls


def test_failed_step_ends_its_requests_and_the_engine_recovers(smollm2_loaded):
    core = make_engine_core(smollm2_loaded)
    engine = AsyncEngine(core).start()
    token_ids = smollm2_loaded[0].tokenizer.encode("Count to one hundred:")
    _fail_steps(core, {4})
    long_params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
    try:
        async def main():
            tasks = [asyncio.create_task(collect(engine, f"d{i}", token_ids, long_params)) for i in range(3)]
            return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)

        results = asyncio.run(main())
        assert all(isinstance(r, EngineStepError) for r in results), results
        assert "injected forward failure" in str(results[0])
        assert engine.is_healthy and engine.num_step_failures == 1
        assert core.kv_cache_manager.num_free_blocks == core.kv_cache_manager.block_pool.num_blocks

        async def late():
            return await collect(engine, "late", token_ids, SamplingParams(temperature=0.0, max_tokens=5))

        assert asyncio.run(late())[-1].finished
    finally:
        engine.shutdown()


def test_a_step_that_keeps_failing_kills_the_loop_and_every_caller_learns_it(smollm2_loaded):
    core = make_engine_core(smollm2_loaded)
    engine = AsyncEngine(core).start()
    token_ids = smollm2_loaded[0].tokenizer.encode("Count to one hundred:")
    _fail_steps(core, None)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    try:
        async def one(i):
            return await asyncio.wait_for(collect(engine, f"k{i}", token_ids, params), timeout=30)

        errors = []
        for i in range(MAX_CONSECUTIVE_STEP_FAILURES):
            with pytest.raises((EngineStepError, EngineDeadError)) as raised:
                asyncio.run(one(i))
            errors.append(type(raised.value))
        assert errors == [EngineStepError] * (MAX_CONSECUTIVE_STEP_FAILURES - 1) + [EngineDeadError]
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            asyncio.run(one("late"))
    finally:
        engine.shutdown()


def test_bad_input_is_rejected_and_engine_keeps_serving(smollm2_loaded):
    core = make_engine_core(smollm2_loaded)
    engine = AsyncEngine(core).start()
    token_ids = smollm2_loaded[0].tokenizer.encode("Hello")
    try:
        async def main():
            with pytest.raises(InvalidRequestError):
                await collect(engine, "empty", [])
            with pytest.raises(InvalidRequestError):
                await collect(engine, "long", token_ids * (core.max_model_len // len(token_ids) + 1))
            with pytest.raises(InvalidRequestError):
                await collect(engine, "oov", [core.arch.vocab_size + 5])
            with pytest.raises(InvalidRequestError):
                await collect(engine, "bias", token_ids, SamplingParams(logit_bias={10**9: 1.0}))
            return await collect(engine, "fine", token_ids)

        deltas = asyncio.run(main())
        assert deltas[-1].finished and engine.is_healthy
    finally:
        engine.shutdown()


def test_queue_bound(smollm2_loaded):
    core = make_engine_core(smollm2_loaded, max_num_seqs=1, max_num_waiting=1)
    engine = AsyncEngine(core).start()
    token_ids = smollm2_loaded[0].tokenizer.encode("Hello there")
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    try:
        async def main():
            tasks = [asyncio.create_task(collect(engine, f"q{i}", token_ids, params)) for i in range(4)]
            return await asyncio.gather(*tasks, return_exceptions=True)

        results = asyncio.run(main())
        rejected = [r for r in results if isinstance(r, QueueFullError)]
        served = [r for r in results if isinstance(r, list)]
        assert len(rejected) == 2 and len(served) == 2
    finally:
        engine.shutdown()


def test_build_loads_and_steps_in_the_engine_thread(smollm2_loaded):
    tokenizer = smollm2_loaded[0].tokenizer
    token_ids = tokenizer.encode(PROMPTS[0])
    expected = make_llm(smollm2_loaded).generate([token_ids], GREEDY)[0].outputs[0].token_ids
    builder_threads = []

    def build():
        builder_threads.append(threading.current_thread())
        return make_engine_core(smollm2_loaded)

    engine = AsyncEngine.build(build)
    try:
        assert builder_threads == [engine._thread] and engine._thread is not threading.current_thread()
        assert engine.is_healthy
        deltas = asyncio.run(collect(engine, "built", token_ids))
        assert [t for d in deltas for t in d.new_token_ids] == expected
    finally:
        engine.shutdown()
    assert not engine._thread.is_alive()


def test_build_raises_what_loading_raised():
    def build():
        raise InvalidRequestError("no such model")

    with pytest.raises(InvalidRequestError, match="no such model"):
        AsyncEngine.build(build)
