"""Builders for integration tests: engines over the shared weights."""

from tokenforge.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenforge.engine.engine_core import EngineCore
from tokenforge.engine.llm import LLM

TEST_KV_BYTES = 256 << 20


def make_engine_core(loaded, *, num_blocks: int | None = None, block_size: int = 16, prefix_caching: bool = True,
                     max_num_batched_tokens: int = 2048, max_num_seqs: int = 128,
                     max_num_waiting: int = 1024) -> EngineCore:
    model, dtype, device = loaded
    cache = CacheConfig(block_size=block_size, kv_cache_memory_bytes=TEST_KV_BYTES,
                        num_blocks_override=num_blocks, enable_prefix_caching=prefix_caching)
    scheduler = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_num_waiting=max_num_waiting)
    return EngineCore(EngineConfig(cache=cache, scheduler=scheduler), model, dtype, device)


def make_llm(loaded, **options) -> LLM:
    return LLM(engine=make_engine_core(loaded, **options))
