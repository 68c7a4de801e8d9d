"""Builders shared by the engine's unit tests: requests, KV cache managers and schedulers."""

from tokenforge.config import SchedulerConfig
from tokenforge.engine.kv_cache_manager import KVCacheManager
from tokenforge.engine.request import Request
from tokenforge.engine.scheduler import SampledToken, Scheduler, SchedulerOutput
from tokenforge.sampling_params import SamplingParams

BLOCK_SIZE = 4
EOS_TOKEN_ID = 2
# The token the driver samples by default: neither EOS nor a stop token of any test.
SAMPLED_TOKEN_ID = 7


def make_request(
    request_id: str = "r",
    prompt: list[int] | None = None,
    num_prompt_tokens: int | None = None,
    eos_token_id: int | None = EOS_TOKEN_ID,
    **params,
) -> Request:
    """A request whose prompt is `prompt`, or 100, 101, ... of length num_prompt_tokens."""
    if prompt is None:
        prompt = list(range(100, 100 + (num_prompt_tokens or BLOCK_SIZE)))
    params.setdefault("max_tokens", None)
    return Request(request_id, list(prompt), SamplingParams(**params), eos_token_id=eos_token_id)


def make_kv_cache_manager(
    num_blocks: int = 8, block_size: int = BLOCK_SIZE, enable_caching: bool = True
) -> KVCacheManager:
    return KVCacheManager(num_blocks, block_size, enable_caching)


def make_scheduler(
    num_blocks: int = 16,
    block_size: int = BLOCK_SIZE,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 1024,
    enable_caching: bool = True,
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
    return Scheduler(config, make_kv_cache_manager(num_blocks, block_size, enable_caching), max_model_len)


def sample_for(output: SchedulerOutput, tokens: dict[str, int] | None = None) -> dict[str, list[SampledToken]]:
    """What a model runner returns: a token for each request whose scheduled tokens end its sequence."""
    tokens = tokens or {}
    sampled = {}
    for request in output.scheduled_requests:
        num_scheduled = output.num_scheduled_tokens[request.request_id]
        if request.num_computed_tokens + num_scheduled == request.num_tokens:
            sampled[request.request_id] = [SampledToken(tokens.get(request.request_id, SAMPLED_TOKEN_ID))]
    return sampled


def run_step(scheduler: Scheduler, tokens: dict[str, int] | None = None) -> tuple[SchedulerOutput, list[Request]]:
    """One engine step by hand: schedule, 'run the model', update."""
    output = scheduler.schedule()
    updated = scheduler.update(output, sample_for(output, tokens))
    return output, updated
