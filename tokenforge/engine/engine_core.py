"""EngineCore: owns the model runner, the scheduler and the detokenizers; one step at a time.

Not thread-safe: one thread drives it (see async_engine for the asyncio front).
"""

import logging
import time

import torch

from tokenforge.config import EngineConfig
from tokenforge.engine.detokenizer import IncrementalDetokenizer
from tokenforge.engine.kv_cache_manager import KVCacheManager
from tokenforge.engine.outputs import RequestOutput
from tokenforge.engine.request import Request, RequestStatus
from tokenforge.engine.scheduler import Scheduler
from tokenforge.errors import ConfigError, InvalidRequestError
from tokenforge.model.loader import LoadedModel
from tokenforge.sampling_params import SamplingParams
from tokenforge.spec.controller import SpecController
from tokenforge.spec.draft_model import DraftModelProposer
from tokenforge.spec.hybrid import HybridProposer
from tokenforge.spec.ngram import NgramProposer
from tokenforge.spec.timing import measure_verify_cost, time_forward_pass
from tokenforge.worker.memory import num_kv_blocks, pick_cache_dtype
from tokenforge.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, loaded: LoadedModel, dtype: torch.dtype, device: torch.device,
                 draft: LoadedModel | None = None):
        """`draft`: the loaded draft model when config.speculative.method is "draft"."""
        self.config = config
        self.arch = loaded.arch_config
        self.tokenizer = loaded.tokenizer
        block_size = config.cache.block_size
        cache_dtype = pick_cache_dtype(config.cache.cache_dtype, self.arch, dtype, device)
        num_blocks = num_kv_blocks(config.cache, self.arch, cache_dtype, device)
        capacity = num_blocks * block_size
        model_len = config.model.max_model_len or self.arch.max_position_embeddings
        if model_len > self.arch.max_position_embeddings:
            raise ConfigError(
                f"max_model_len {model_len} exceeds the model's context of {self.arch.max_position_embeddings}"
            )
        # One request alone must always fit in the cache, or preemption could never make room.
        self.max_model_len = min(model_len, capacity)
        if self.max_model_len < model_len:
            logger.warning("KV cache holds %d tokens: max_model_len lowered from %d", capacity, model_len)
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB of %s)", num_blocks, block_size,
                    capacity, capacity * self.arch.kv_bytes_per_token(cache_dtype.itemsize) / 2**20, cache_dtype)
        self.kv_cache_manager = KVCacheManager(num_blocks, block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache_manager, self.max_model_len)
        self.runner = ModelRunner(loaded.model, self.arch, num_blocks, block_size, cache_dtype, device)
        self.spec = _build_spec_controller(config, loaded, draft, self.runner, self.max_model_len)
        self._propose_s = 0.0  # time of the drafting for the coming step
        # Parameters of the loaded weights (tied embeddings once): what the price book buckets by.
        self.num_params = loaded.num_params
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.num_steps = 0

    @property
    def eos_token_id(self) -> int | None:
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            return self.tokenizer.eos_token_id
        return self.arch.eos_token_id

    def make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> Request:
        """Validates a request against the model; raises InvalidRequestError for bad input."""
        if not prompt_token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.arch.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is {self.max_model_len} "
                "tokens, and at least one must be left to generate",
                param="messages",
            )
        params.validate_for_vocab(vocab)
        return Request(request_id, list(prompt_token_ids), params, eos_token_id=self.eos_token_id)

    def add_request(self, request: Request) -> None:
        if self.tokenizer is not None:
            self.detokenizers[request.request_id] = IncrementalDetokenizer(
                self.tokenizer, request.prompt_token_ids, request.sampling_params
            )
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        request = self.scheduler.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        self.detokenizers.pop(request_id, None)
        return None if request is None else self._output(request, [], "")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return []
        num_outputs = {r.request_id: r.num_output_tokens for r in scheduled.scheduled_requests}
        started = time.perf_counter()
        sampled = self.runner.execute(scheduled)
        if self.spec is not None:
            # The step's time includes the drafting that prepared it (at the end of the last step).
            self.spec.record(scheduled, sampled, time.perf_counter() - started + self._propose_s)
        updated = self.scheduler.update(scheduled, sampled)
        self.num_steps += 1
        outputs = [self._process(r, r.num_output_tokens - num_outputs[r.request_id]) for r in updated]
        if self.spec is not None:
            started = time.perf_counter()
            self.spec.propose(self.scheduler.running)  # drafts for the next step
            self._propose_s = time.perf_counter() - started
        return outputs

    def _process(self, request: Request, num_new: int) -> RequestOutput:
        """Detokenizes the request's new tokens (several with speculative decoding) and applies
        stop strings, token by token: tokens after one that completes a stop string are dropped."""
        first = request.num_output_tokens - num_new  # output index of the first new token
        new_token_ids = request.output_token_ids[first:]
        detokenizer = self.detokenizers.get(request.request_id)
        if detokenizer is None:
            return self._output(request, new_token_ids, "")
        params = request.sampling_params
        stopped_by_token = request.status == RequestStatus.FINISHED_STOPPED
        # As OpenAI and vLLM do, the text of a stop token (or EOS) is not part of the output.
        visible = new_token_ids[:-1] if stopped_by_token and not params.include_stop_str_in_output else new_token_ids
        stop = None
        for index, token_id in enumerate(visible, start=first + 1):
            # Stop strings count only once min_tokens are out (EOS and stop ids are banned until then).
            stop = detokenizer.update([token_id], check_stop=index > params.min_tokens)
            if stop is not None:
                del request.output_token_ids[index:]
                del request.output_logprobs[index:]
                new_token_ids = new_token_ids[: index - first]
                break
        if stop is not None:
            request.stop_reason = stop
            if request.is_finished:  # the same token also reached max_tokens: the stop string wins
                request.status = RequestStatus.FINISHED_STOPPED
            else:
                self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED)
        if request.is_finished:
            if stop is None:
                detokenizer.finish()
            del self.detokenizers[request.request_id]
        return self._output(request, new_token_ids, detokenizer.take_delta())

    def _output(self, request: Request, new_token_ids: list[int], text: str) -> RequestOutput:
        num_new = len(new_token_ids)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            new_text=text,
            finished=request.is_finished,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=request.num_cached_tokens or 0,
            num_output_tokens=request.num_output_tokens,
            new_logprobs=request.output_logprobs[-num_new:] if num_new and request.output_logprobs else [],
        )

    def stats(self) -> dict[str, float]:
        """Gauges for /metrics; spec_* (speculative decoding, since start) only when it is on."""
        kv = self.kv_cache_manager
        queried = kv.num_prefix_queried_tokens
        stats = {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": kv.usage,
            "prefix_cache_hit_rate": kv.num_prefix_hit_tokens / queried if queried else 0.0,
        }
        if self.spec is not None:
            stats.update(self.spec.stats_dict())
        return stats


def _build_spec_controller(config: EngineConfig, loaded: LoadedModel, draft: LoadedModel | None, runner: ModelRunner,
                           max_model_len: int) -> SpecController | None:
    spec = config.speculative
    if not spec.enabled:
        return None
    kv_caches = runner.kv_caches
    # The target's one-token step, the unit of both costs below (timed once, before any request).
    target_s = time_forward_pass(loaded.model, kv_caches, runner.block_size, runner.device)
    if spec.method == "ngram":
        proposer = NgramProposer(spec.ngram_min, spec.ngram_max)
    elif spec.uses_draft_model:
        if draft is None:
            raise ConfigError(f"speculative method {spec.method!r} needs a draft model (--draft-model)")
        proposer = DraftModelProposer(draft, loaded, kv_caches.shape[1], runner.block_size, kv_caches.dtype,
                                      runner.device, spec.draft_head_ids)
        proposer.measure_cost(target_s)
    else:
        raise ConfigError(f"unknown speculative method {spec.method!r} (choose ngram, draft or hybrid)")
    verify_cost = measure_verify_cost(loaded.model, kv_caches, runner.block_size, runner.device,
                                      spec.num_speculative_tokens, target_s)
    if spec.method == "hybrid":
        proposer = HybridProposer(proposer, spec.hybrid_min_match, spec.ngram_max, spec.num_speculative_tokens,
                                  verify_cost)
    logger.info("speculative decoding (%s), measured in target steps: a draft step %.2f, one more verified "
                "token %.2f", spec.method, proposer.draft_cost, verify_cost)
    return SpecController(spec, proposer, max_model_len, verify_cost, timed=True)
