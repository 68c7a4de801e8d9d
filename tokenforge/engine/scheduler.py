"""Scheduler: continuous batching with chunked prefill under a token budget, and preemption.

Each step, running requests go first (decode, or the next prefill chunk), then waiting requests
are admitted through the KV cache manager (prefix hits first). When blocks run out, the most
recently admitted running request is preempted: its blocks are freed and it recomputes later.
"""

from collections import deque
from dataclasses import dataclass, field

from tokenforge.config import SchedulerConfig
from tokenforge.engine.kv_cache_manager import KVCacheManager
from tokenforge.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    # Requests that run this step, in batch order: running ones first, then new admissions.
    scheduled_requests: list[Request] = field(default_factory=list)
    # request_id -> tokens computed this step (a prompt chunk, or 1 when decoding, plus any
    # draft tokens to verify).
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # request_id -> draft tokens to verify this step, the last of its scheduled tokens (only
    # requests that have some).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # request_id -> the request's block table after this step's allocation.
    block_ids: dict[str, list[int]] = field(default_factory=dict)
    # Requests preempted this step: their blocks are freed and they wait to recompute.
    preempted_request_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not self.scheduled_requests

    def add(self, request: Request, num_tokens: int, block_ids: list[int]) -> None:
        self.scheduled_requests.append(request)
        self.num_scheduled_tokens[request.request_id] = num_tokens
        self.block_ids[request.request_id] = block_ids


@dataclass
class SampledToken:
    token_id: int
    # (logprob of token_id, [(token_id, logprob)] best first) when the request asked for it.
    logprobs: tuple[float, list[tuple[int, float]]] | None = None


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager, max_model_len: int):
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.num_preemptions = 0  # since start, for metrics and tests

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        assert request.request_id not in self.requests, request.request_id
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = request.num_tokens - request.num_computed_tokens
            num_tokens = min(num_new + len(request.spec_token_ids), budget)
            if not self._allocate_or_preempt(request, num_tokens, output):
                break  # the request preempted itself
            output.add(request, num_tokens, self.kv_cache_manager.get_block_ids(request.request_id))
            if num_tokens > num_new:  # drafts cut short by the budget are dropped
                output.spec_token_ids[request.request_id] = request.spec_token_ids[: num_tokens - num_new]
            budget -= num_tokens
            index += 1
        if not output.preempted_request_ids:
            self._admit_waiting(budget, output)
        return output

    def _allocate_or_preempt(self, request: Request, num_tokens: int, output: SchedulerOutput) -> bool:
        while self.kv_cache_manager.allocate_slots(request, num_tokens) is None:
            victim = self.running.pop()
            self._preempt(victim)
            output.preempted_request_ids.append(victim.request_id)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.spec_draft_probs = None
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, output: SchedulerOutput) -> None:
        kv = self.kv_cache_manager
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            computed_blocks, num_computed = kv.get_computed_blocks(request)
            num_tokens = min(request.num_tokens - num_computed, budget)
            if kv.allocate_slots(request, num_tokens, computed_blocks) is None:
                break  # first come, first served: later requests wait too
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_computed
            if request.num_cached_tokens is None:
                request.num_cached_tokens = num_computed
            self.running.append(request)
            output.add(request, num_tokens, kv.get_block_ids(request.request_id))
            budget -= num_tokens

    def update(self, output: SchedulerOutput, sampled: dict[str, list[SampledToken]]) -> list[Request]:
        """Advances the scheduled requests; returns those that got tokens (finished ones too).

        sampled[request_id]: the accepted draft tokens, then one token the target chose (a
        single token without speculation). Rejected drafts' K/V slots are rolled back.
        """
        updated = []
        for request in output.scheduled_requests:
            if request.is_finished:
                continue
            request_id = request.request_id
            tokens = sampled.get(request_id, [])
            num_drafts = len(output.spec_token_ids.get(request_id, ()))
            num_rejected = num_drafts - (len(tokens) - 1) if num_drafts else 0
            request.num_computed_tokens += output.num_scheduled_tokens[request_id] - num_rejected
            request.spec_token_ids = []
            request.spec_draft_probs = None
            status = None
            for token in tokens:
                request.output_token_ids.append(token.token_id)
                if token.logprobs is not None:
                    request.output_logprobs.append((token.token_id, *token.logprobs))
                status = self._check_stop(request, token.token_id)
                if status is not None:
                    break  # later accepted tokens are dropped, as if generated one at a time
            # A stop inside the accepted tokens leaves computed K/V past the shortened sequence.
            request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens)
            if num_rejected:
                self.kv_cache_manager.trim(request, request.num_tokens)
            self.kv_cache_manager.cache_blocks(request)
            if not tokens:
                continue  # a prompt chunk that did not reach the end of the prompt
            if status is not None:
                self.finish_request(request_id, status)
            updated.append(request)
        return updated

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if token_id == request.eos_token_id and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """Ends a request (stop, length, abort, error) and frees its blocks; None if unknown."""
        assert status.finished
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = status
        self.kv_cache_manager.forget(request)
        return request
