"""Quantized linear layers for the CPU, where decoding a few sequences is bound by how many bytes
of weights a step reads from memory.

- int8 (weight-only): int8 weights with one scale per output channel, dequantized to the model's
  dtype a slice at a time (CHUNK_ELEMENTS, a size that stays in the CPU's cache) right before MKL's
  fp32 matmul reads it: a quarter of the memory traffic of fp32 weights, the activations untouched.
  (PyTorch's own packed int8/int4 CPU kernels, aten._weight_int8pack_mm and
  _weight_int4pack_mm_for_cpu, were 1.5x-30x slower than fp32 on an AVX2 CPU, measured.)
- w8a8: the same int8 weights times int8 activations quantized per token on the fly, accumulated in
  int32 by torch._int_mm (about 4x fp32's speed at 64 rows) at some cost in quality.

quantize_model(model, method) replaces every nn.Linear of a loaded model in place, and gives a model
whose output head is tied to its embedding a quantized copy to compute logits with (the embedding
itself stays as it is: a lookup reads only the rows it needs).
"""

import torch
import torch.nn.functional as F
from torch import nn

from tokenforge.config import QUANTIZATIONS

CHUNK_ELEMENTS = 1024 * 576  # weights dequantized at once: 2.25 MiB in fp32, cache-sized


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [out, in] and one fp32 scale per output row [out, 1]."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(weight / scales).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scales = quantize_rows(weight)
        self.register_buffer("weight", codes)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.chunk_rows = max(1, CHUNK_ELEMENTS // self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if self.out_features <= self.chunk_rows:
            out = F.linear(rows, self.dequantized(0, self.out_features, x.dtype))
        else:
            out = torch.empty(rows.shape[0], self.out_features, dtype=x.dtype, device=x.device)
            for start in range(0, self.out_features, self.chunk_rows):
                end = min(start + self.chunk_rows, self.out_features)
                torch.mm(rows, self.dequantized(start, end, x.dtype).t(), out=out[:, start:end])
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, end) of the weight in `dtype` (convert, then scale in place: two fast passes)."""
        return self.weight[start:end].to(dtype).mul_(self.scales[start:end].to(dtype))


class W8A8Linear(nn.Module):
    """int8 weights (per output channel) times int8 activations (per token, quantized on the fly),
    accumulated in int32 by torch._int_mm, then rescaled."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        codes, scales = quantize_rows(weight)
        self.register_buffer("weight", codes)  # used as its transpose [in, out]: what _int_mm reads fastest
        self.register_buffer("scales", scales.view(1, -1))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        x_scales = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        codes = torch.round(rows / x_scales).to(torch.int8)
        out = torch._int_mm(codes, self.weight.t()).to(x.dtype) * (x_scales * self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


_LAYERS = {"int8": Int8Linear, "w8a8": W8A8Linear}


def quantize_model(model: nn.Module, method: str) -> int:
    """Replaces the model's nn.Linear layers (and its tied output head) with `method`'s; returns
    how many layers it quantized. "none" changes nothing."""
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r} (choose from {', '.join(QUANTIZATIONS)})")
    if method == "none":
        return 0
    make = _LAYERS[method]
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(linear.weight, linear.bias))
    count = len(targets)
    if getattr(model, "lm_head", "absent") is None and hasattr(model, "embed_tokens"):
        model.lm_head = make(model.embed_tokens.weight, None)  # a quantized copy; the embedding stays
        count += 1
    return count
