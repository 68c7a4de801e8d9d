"""4-bit linear layers for the CPU: half the bytes of int8 per weight (0.53 with the group
multipliers), for decoding a few streams, which is bound by the read of the weights.

A group of 32 weights of one output row holds 32 indices (4 bits) into LEVELS and one int8
multiplier u; weight i is code_i * scale (the row's fp32 scale), with the int8 code

    code_i = (LEVELS[index_i] * u + 64) >> 7  (an exact integer, |code| <= 127)

So a 4-bit layer is an int8 layer whose codes are computed, not stored: every path of Int8Linear
runs on them unchanged, with the same bits (the C loops expand a group's codes in registers;
_int_mm gets the whole matrix expanded). LEVELS are 16 even steps from -127 to 111
(Q4_0's grid); u gives each group its own step, as Q4_0's fp16 scale per 32 weights does, but as a
multiple of the row's scale, which keeps the codes integers. The quantizer (native/int4_codes.c)
tries u around the one that maps the group's largest weight to -127 and keeps, per group, the one
of least squared error. 4-bit layers need the native kernels; the torch path here (codes()) is the
reference the tests compare them with.

Quality on the fixed text (SmolLM2-135M, 512-token windows): fp32 22.67; 4-bit layers with an int8
output head 25.9 (+14%), with a 4-bit head 28.2; Q4_0's own rounding (an fp scale per group)
gives 26.2 and 28.1 there. quantize.py keeps the head in int8, as llama.cpp's Q4_0 files do.
"""

import threading

import torch

from tokenforge.model.layers.native import int8_kernels
from tokenforge.model.layers.quant_linear import Int8Linear

GROUP = 32
LEVELS = torch.tensor([-127, -111, -95, -79, -64, -48, -32, -16, 0, 16, 32, 48, 64, 79, 95, 111])


def group_codes(indices: torch.Tensor, multipliers: torch.Tensor) -> torch.Tensor:
    """The codes (as integers in a float or int tensor) of indices [..., G, n] under multipliers
    [..., G, 1]: floor((LEVELS[index] * u + 64) / 128), exact in fp32 and in int32."""
    levels = LEVELS.to(multipliers.dtype)[indices] * multipliers + 64
    return torch.div(levels, 128, rounding_mode="floor")


def quantize_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """4-bit indices packed [out, in / 2] (uint8: byte j of a group holds weight j's index in its
    low nibble, weight j + 16's in its high one), multipliers [out, in / 32] (int8) and row scales
    [out, 1] (fp32), by int4_quantize (native/int4_codes.c: ~2 s for SmolLM2's layers)."""
    out_features, in_features = weight.shape
    if in_features % GROUP:
        raise ValueError(f"4-bit groups need an input width that is a multiple of {GROUP}, not {in_features}")
    kernels = int8_kernels()
    if kernels is None:
        raise ValueError("4-bit layers need the native kernels (x86-64 with AVX2 and a C compiler)")
    weight = weight.detach().float().cpu().contiguous()
    packed = torch.empty((out_features, in_features // 2), dtype=torch.uint8)
    multipliers = torch.empty((out_features, in_features // GROUP), dtype=torch.int8)
    scales = torch.empty((out_features, 1), dtype=torch.float32)
    kernels.int4_quantize(weight.data_ptr(), out_features, in_features, packed.data_ptr(), multipliers.data_ptr(),
                          scales.data_ptr(), torch.get_num_threads())
    return packed, multipliers, scales


def unpack_codes(packed: torch.Tensor, multipliers: torch.Tensor, slice_rows: int = 4096) -> torch.Tensor:
    """The int8 codes [out, in] of 4-bit groups (what int4_unpack computes in C)."""
    out_features, groups = multipliers.shape
    codes = torch.empty((out_features, groups * GROUP), dtype=torch.int8)
    for start in range(0, out_features, slice_rows):
        part = packed[start:start + slice_rows].view(-1, groups, GROUP // 2).int()
        indices = torch.cat([part & 15, part >> 4], dim=2).long()
        u = multipliers[start:start + slice_rows].int().unsqueeze(2)
        codes[start:start + part.shape[0]] = group_codes(indices, u).to(torch.int8).view(part.shape[0], -1)
    return codes


_expanded = threading.local()  # one buffer per thread for the codes of the layer _int_mm runs now


def _expansion_buffer(numel: int) -> torch.Tensor:
    buffer = getattr(_expanded, "buffer", None)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=torch.int8)
        _expanded.buffer = buffer
    return buffer[:numel]


class Int4Linear(Int8Linear):
    """An Int8Linear whose codes are 4-bit groups (see the module docstring); the same forward paths."""

    def _store_weights(self, weight: torch.Tensor) -> None:
        packed, multipliers, scales = quantize_groups(weight)
        self.register_buffer("weight", packed)  # what the layer holds; codes() gives the int8 codes
        self.register_buffer("group_scales", multipliers)
        self.register_buffer("scales", scales.view(1, -1))

    def _weight_pointers(self) -> tuple[int | None, int | None, int | None]:
        return None, self.weight.data_ptr(), self.group_scales.data_ptr()

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.weight, self.group_scales)

    def _native_codes(self) -> torch.Tensor:
        """The codes, expanded in C into this thread's buffer (valid until the next layer's)."""
        kernels = self._rows_call()
        codes = _expansion_buffer(self.out_features * self.in_features)
        kernels.int4_unpack(self._row_args.address, codes.data_ptr())
        return codes.view(self.out_features, self.in_features)
