"""int8 linear layers for the CPU, where decoding a few sequences is bound by how many bytes of
weights a step reads from memory: the weights are stored as int8 codes with one scale per output
channel (a quarter of fp32's bytes) and multiplied by torch._int_mm (int8 x int8 -> int32, MKL's
integer GEMM) without ever being dequantized.

The activations are quantized per token on the fly, symmetrically, into int8 "digits":
- int8: two digits, x / scale = hi + lo / 254 with hi, lo in [-127, 127], both multiplied in one
  _int_mm of twice the rows (at a few rows the weights are read once either way). The activation
  keeps about 15 bits, so the result is that of int8 weights alone (weight-only quality).
- w8a8: one digit (x / scale rounded): half the integer work, at some cost in quality.

One row (single-stream decode, a draft model's steps) goes to a native AVX2 kernel
(layers/native/int8_row.c, compiled on first use) that computes the same bits in one call instead
of ~16 small torch ops around a two-row _int_mm: 2-3x faster per layer, and the output of a row
never depends on the batch it ran in (speculative verification runs k + 1 rows, plain decode one).

(PyTorch's packed weight-only kernels, aten._weight_int8pack_mm and _weight_int4pack_mm_for_cpu,
were 1.5x-30x slower than fp32 MKL on an AVX2 CPU, measured; dequantizing slices to fp32 before an
fp32 matmul was 2.3x slower than two-digit _int_mm at one row.)

quantize_model(model, method) replaces every nn.Linear of a loaded model in place, and gives a model
whose output head is tied to its embedding a quantized copy to compute logits with (the embedding
itself stays as it is: a lookup reads only the rows it needs).
"""

import torch
from torch import nn

from tokenforge.config import QUANTIZATIONS
from tokenforge.model.layers.native import int8_row_kernel

ROW_KERNEL_STEP = 32
LOW_DIGIT = 254  # x / scale = hi + lo / LOW_DIGIT: lo carries the rounding error of hi, |error| <= 0.5


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes [out, in] and one fp32 scale per output row [out, 1]."""
    weight = weight.detach().float()
    scales = weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    return torch.round(weight / scales).clamp(-127, 127).to(torch.int8), scales


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, activation_digits: int = 2):
        super().__init__()
        if activation_digits not in (1, 2):
            raise ValueError(f"activation_digits must be 1 or 2, not {activation_digits}")
        self.out_features, self.in_features = weight.shape
        self.activation_digits = activation_digits
        codes, scales = quantize_rows(weight)
        self.register_buffer("weight", codes)  # read as its transpose [in, out], the layout _int_mm reads fastest
        self.register_buffer("scales", scales.view(1, -1))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        # One-row calls (single-stream decode) go to the native AVX2 kernel where it runs; its
        # loops take the input width in steps of 32.
        self.row_kernel = int8_row_kernel() if self.in_features % ROW_KERNEL_STEP == 0 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        num_rows = rows.shape[0]
        if num_rows == 1 and self._row_kernel_fits(rows):
            out = self._forward_row(rows)
            return out.reshape(*x.shape[:-1], self.out_features)
        x_scales = rows.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
        scaled = rows / x_scales
        high = torch.round(scaled)
        if self.activation_digits == 1:
            out = torch._int_mm(high.to(torch.int8), self.weight.t()).to(x.dtype)
        else:
            low = torch.round((scaled - high) * LOW_DIGIT)
            both = torch._int_mm(torch.cat([high, low]).to(torch.int8), self.weight.t()).to(x.dtype)
            # Separately rounded ops (no alpha, no fused multiply-add): the row kernel repeats them.
            out = both[:num_rows] + both[num_rows:] * (1 / LOW_DIGIT)
        out = out * (x_scales * self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _row_kernel_fits(self, rows: torch.Tensor) -> bool:
        return (self.row_kernel is not None and rows.dtype == torch.float32 and rows.device.type == "cpu"
                and rows.is_contiguous() and not torch.is_grad_enabled()
                and (self.bias is None or (self.bias.dtype == torch.float32 and self.bias.is_contiguous())))

    def _forward_row(self, row: torch.Tensor) -> torch.Tensor:
        """One row through the native kernel: the same bits as the torch path, one call."""
        out = torch.empty((1, self.out_features), dtype=torch.float32)
        work = torch.empty(2 * self.in_features, dtype=torch.int8)
        bias = None if self.bias is None else self.bias.data_ptr()
        self.row_kernel(row.data_ptr(), self.weight.data_ptr(), self.scales.data_ptr(), bias, out.data_ptr(),
                        self.in_features, self.out_features, self.activation_digits, work.data_ptr(),
                        torch.get_num_threads())
        return out


def w8a8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    return Int8Linear(weight, bias, activation_digits=1)


_LAYERS = {"int8": Int8Linear, "w8a8": w8a8_linear}


def quantize_model(model: nn.Module, method: str) -> int:
    """Replaces the model's nn.Linear layers (and its tied output head) with `method`'s; returns
    how many layers it quantized. "none" changes nothing ("auto" is resolved by the caller)."""
    if method not in QUANTIZATIONS or method == "auto":
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
