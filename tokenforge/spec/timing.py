"""Timed forward passes, for the costs the adaptive k weighs: a draft step and one more verified
token, each relative to a one-token step of the target, measured on this machine when the engine
starts (kernels differ: one row may run a native kernel, several rows a matmul library)."""

import time
from collections.abc import Callable

import torch

from tokenforge.engine.kv_cache_manager import cdiv
from tokenforge.worker.batch import SequenceChunk, build_batch


@torch.inference_mode()
def time_forward_pass(model: torch.nn.Module, kv_caches: torch.Tensor, block_size: int, device: torch.device,
                      num_tokens: int = 1, num_repeats: int = 5,
                      logits: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Seconds of the fastest of num_repeats passes of num_tokens tokens at positions 0.. with all
    their logits (a decode step, or a verification of num_tokens - 1 drafts), after one warm-up
    pass; logits: hidden -> logits (default model.compute_logits). Writes K/V into the first
    blocks: run it before any request holds them."""
    logits = model.compute_logits if logits is None else logits
    block_ids = list(range(cdiv(num_tokens, block_size)))
    batch = build_batch([SequenceChunk([0] * num_tokens, 0, block_ids, num_tokens)], block_size, device)
    best = float("inf")
    for repeat in range(num_repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        hidden = model(batch.input_ids, batch.positions, kv_caches, batch.meta)
        logits(hidden[batch.logits_indices]).float().cpu()
        if repeat:
            best = min(best, time.perf_counter() - started)
    return best


def measure_verify_cost(model: torch.nn.Module, kv_caches: torch.Tensor, block_size: int, device: torch.device,
                        num_drafts: int, one_token_s: float) -> float:
    """Extra cost of each verified draft token, in one-token steps: (t(k + 1) / t(1) - 1) / k, with
    t(1) = one_token_s (time_forward_pass of the same model, timed once by the caller)."""
    several = time_forward_pass(model, kv_caches, block_size, device, num_drafts + 1)
    return max(0.0, (several / one_token_s - 1.0) / num_drafts)
