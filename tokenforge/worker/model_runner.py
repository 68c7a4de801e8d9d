"""ModelRunner: turns a SchedulerOutput into one flat batch, runs the model, samples tokens."""

import math
import mmap

import torch

from tokenforge.engine.kv_cache_manager import cdiv
from tokenforge.engine.request import Request
from tokenforge.engine.scheduler import SampledToken, SchedulerOutput
from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.layers.attention import AttentionMetadata
from tokenforge.worker.sampler import Sampler


class ModelRunner:
    def __init__(self, model: torch.nn.Module, arch: ArchConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.model = model
        self.device = device
        self.block_size = block_size
        # [num_layers, num_blocks, block_size, 2 (k, v), num_kv_heads, head_dim]; zeroed so that
        # padded reads of never-written slots see finite values.
        shape = (arch.num_layers, num_blocks, block_size, 2, arch.num_kv_heads, arch.head_dim)
        self.kv_caches = allocate_zeroed(shape, dtype, device)
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> dict[str, SampledToken]:
        input_ids, positions, meta, logits_indices, sample_requests = self.prepare(scheduled)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not sample_requests:
            return {}
        logits = self.model.compute_logits(hidden[logits_indices]).float()
        out = self.sampler(logits, sample_requests)
        return {
            request.request_id: SampledToken(token_id, logprobs)
            for request, token_id, logprobs in zip(sample_requests, out.sampled_token_ids, out.logprobs)
        }

    def prepare(self, scheduled: SchedulerOutput):
        """Builds every tensor of the step's batch; decodes (one query token) go first."""
        num_tokens = scheduled.num_scheduled_tokens
        requests = sorted(scheduled.scheduled_requests, key=lambda r: num_tokens[r.request_id] != 1)
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        sample_requests: list[Request] = []
        num_decodes = 0
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[tuple[int, int, int]] = []
        prefill_block_ids: list[torch.Tensor] = []
        for request in requests:
            n = num_tokens[request.request_id]
            start = request.num_computed_tokens
            end = start + n
            block_ids = scheduled.block_ids[request.request_id]
            first = len(input_ids)
            input_ids.extend(_token_slice(request, start, end))
            positions.extend(range(start, end))
            slots.extend(block_ids[p // bs] * bs + p % bs for p in range(start, end))
            if n == 1:
                num_decodes += 1
                decode_tables.append(block_ids[: cdiv(end, bs)])
                decode_lens.append(end)
            else:
                prefills.append((first, n, end))
                prefill_block_ids.append(torch.tensor(block_ids[: cdiv(end, bs)], device=self.device))
            if end == request.num_tokens:  # the whole sequence is computed: sample its next token
                logits_indices.append(first + n - 1)
                sample_requests.append(request)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=self.device),
            num_decodes=num_decodes,
            decode_block_tables=self._pad_tables(decode_tables),
            decode_mask=self._decode_mask(decode_lens),
            prefills=prefills,
            prefill_block_ids=prefill_block_ids,
        )
        as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=self.device)  # noqa: E731
        return as_tensor(input_ids), as_tensor(positions), meta, as_tensor(logits_indices), sample_requests

    def _pad_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max((len(t) for t in tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in tables]
        return torch.tensor(padded, dtype=torch.int64, device=self.device).view(len(tables), width)

    def _decode_mask(self, context_lens: list[int]) -> torch.Tensor:
        width = cdiv(max(context_lens, default=0), self.block_size) * self.block_size
        lens = torch.tensor(context_lens, dtype=torch.int64, device=self.device)
        mask = torch.arange(width, device=self.device).unsqueeze(0) < lens.unsqueeze(1)
        return mask.view(len(context_lens), 1, 1, width)


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
