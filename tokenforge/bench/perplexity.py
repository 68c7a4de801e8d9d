"""Perplexity of a loaded model on a text: how much a change to the weights (quantization) costs in
quality. The text is cut into windows of `window` tokens, each run as one prefill over a paged KV
cache of its own (the engine's attention path); every token after a window's first is predicted.
"""

import math
from importlib import resources

import torch

from tokenforge.model.layers.attention import kv_cache_shape
from tokenforge.worker.batch import SequenceChunk, build_batch

BLOCK_SIZE = 16


def fixed_text() -> str:
    """The text the quality checks use (tokenforge/bench/perplexity.txt, written for this purpose)."""
    return resources.files("tokenforge.bench").joinpath("perplexity.txt").read_text(encoding="utf-8")


@torch.inference_mode()
def perplexity(model: torch.nn.Module, token_ids: list[int], window: int = 512, cache_dtype: torch.dtype | None = None,
               chunk_size: int | None = None) -> float:
    """exp(mean negative log-likelihood) of `token_ids` under `model` (a LlamaForCausalLM).

    cache_dtype: the KV cache's element type (default: the model's). chunk_size: run each window as
    prefill chunks of this many tokens, so that every chunk after the first reads the earlier
    tokens' K/V back from the cache (a whole-window prefill attends to them before they are stored):
    what a cache of lower precision costs."""
    total_nll, num_predicted = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        chunk = token_ids[start:start + window]
        if len(chunk) < 2:
            break
        logits = _prefill_logits(model, chunk, cache_dtype, chunk_size or len(chunk))
        targets = torch.tensor(chunk[1:])
        total_nll += torch.nn.functional.cross_entropy(logits[:-1].float(), targets, reduction="sum").item()
        num_predicted += len(chunk) - 1
    return math.exp(total_nll / num_predicted)


def _prefill_logits(model: torch.nn.Module, token_ids: list[int], cache_dtype: torch.dtype | None,
                    chunk_size: int) -> torch.Tensor:
    """Logits [len(token_ids), vocab] of one sequence prefilled chunk_size tokens at a time."""
    config = model.config
    num_blocks = math.ceil(len(token_ids) / BLOCK_SIZE)
    weight = model.norm.weight  # the model's dtype and device (its embedding may hold int8)
    shape = kv_cache_shape(num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    kv_caches = torch.zeros(config.num_layers, *shape, dtype=cache_dtype or weight.dtype, device=weight.device)
    logits = []
    for start in range(0, len(token_ids), chunk_size):
        piece = token_ids[start:start + chunk_size]
        chunk = SequenceChunk(piece, start=start, block_ids=list(range(num_blocks)), num_logits=len(piece))
        batch = build_batch([chunk], BLOCK_SIZE, weight.device)
        hidden = model(batch.input_ids, batch.positions, kv_caches, batch.meta)
        logits.append(model.compute_logits(hidden[batch.logits_indices]))
    return torch.cat(logits)
