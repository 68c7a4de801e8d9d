"""ModelRunner: turns a SchedulerOutput into one flat batch, runs the model, samples tokens.

Requests with draft tokens (speculative decoding) are verified in the same forward pass: their
last token and drafts run as one chunk, and the sampler accepts a prefix of the drafts.
"""

import math
import mmap

import torch

from tokenforge.engine.request import Request
from tokenforge.engine.scheduler import SampledToken, SchedulerOutput
from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.layers.attention import kv_cache_shape
from tokenforge.worker.batch import ForwardBatch, SequenceChunk, build_batch
from tokenforge.worker.sampler import Sampler


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch: ArchConfig, num_blocks: int, block_size: int,
                 cache_dtype: torch.dtype, device: torch.device):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.kv_caches = allocate_kv_caches(arch, num_blocks, block_size, cache_dtype, device)
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> dict[str, list[SampledToken]]:
        """request_id -> its new tokens: the accepted drafts, then one sampled token."""
        batch = self.prepare(scheduled)
        hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
        requests = scheduled.scheduled_requests
        rows = [(r, rows) for r, rows in zip(requests, batch.logits_rows) if rows]
        if not rows:
            return {}
        logits = self.model.compute_logits(hidden[batch.logits_indices]).float()
        out: dict[str, list[SampledToken]] = {}
        plain = [(r, row.start) for r, row in rows if len(row) == 1]
        if plain:
            sampled = self.sampler(logits[[start for _, start in plain]], [r for r, _ in plain])
            for (request, _), token_id, logprobs in zip(plain, sampled.sampled_token_ids, sampled.logprobs):
                out[request.request_id] = [SampledToken(token_id, logprobs)]
        spec = [(r, row) for r, row in rows if len(row) > 1]
        if spec:
            spec_rows = [i for _, row in spec for i in row]
            drafts = [scheduled.spec_token_ids[r.request_id] for r, _ in spec]
            draft_probs = [_draft_probs(r, len(d)) for (r, _), d in zip(spec, drafts)]
            verified = self.sampler.verify(logits[spec_rows], [r for r, _ in spec], drafts, draft_probs)
            for (request, _), token_ids in zip(spec, verified):
                out[request.request_id] = [SampledToken(t) for t in token_ids]
        return out

    def prepare(self, scheduled: SchedulerOutput) -> ForwardBatch:
        """The step's batch, with logits rows for each request whose whole sequence is computed:
        one row, or k + 1 rows for a request verifying k drafts."""
        chunks = []
        for request in scheduled.scheduled_requests:
            drafts = scheduled.spec_token_ids.get(request.request_id, [])
            start = request.num_computed_tokens
            end = start + scheduled.num_scheduled_tokens[request.request_id] - len(drafts)
            num_logits = len(drafts) + 1 if end == request.num_tokens else 0
            chunks.append(SequenceChunk(_token_slice(request, start, end) + drafts, start,
                                        scheduled.block_ids[request.request_id], num_logits))
        return build_batch(chunks, self.block_size, self.device)


def _draft_probs(request: Request, num_drafts: int) -> torch.Tensor | None:
    """q of the drafts the scheduler kept (it may cut them short); None for one-hot drafts."""
    probs = request.spec_draft_probs
    return None if probs is None else probs[:num_drafts]


def allocate_kv_caches(arch: ArchConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                       device: torch.device) -> torch.Tensor:
    """[num_layers, *kv_cache_shape(...)], zeroed so that padded reads of never-written slots see
    finite values."""
    shape = (arch.num_layers, *kv_cache_shape(num_blocks, block_size, arch.num_kv_heads, arch.head_dim))
    return allocate_zeroed(shape, dtype, device)


def allocate_zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; on the CPU from an anonymous mapping, which the kernel zero-fills page by page on
    first touch, so the budget is reserved at start but memory is used only as blocks fill."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    num_bytes = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, num_bytes), dtype=dtype).view(shape)


def _token_slice(request: Request, start: int, end: int) -> list[int]:
    """request.all_token_ids[start:end] without building the whole list."""
    num_prompt = request.num_prompt_tokens
    if start >= num_prompt:
        return request.output_token_ids[start - num_prompt : end - num_prompt]
    if end <= num_prompt:
        return request.prompt_token_ids[start:end]
    return request.prompt_token_ids[start:] + request.output_token_ids[: end - num_prompt]
