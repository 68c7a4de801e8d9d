"""w8a8-block linear layers for the CPU (--quantization w8a8-block): int8 weights with one scale per
output channel, as int8 layers, times activations rounded to int8 per block of BLOCK inputs, each
block with its own scale, as llama.cpp's Q8_0 rounds them. 8-bit activations let the integer
products run on vpmaddubsw (native/int8_blocks.c: 32 products a multiply instruction against 16
for int8 layers' 16-bit activations), and block scales keep the quality that one scale per row
loses (w8a8): on SmolLM2 and the fixed text, fp32 22.67, int8 +0.39%, w8a8 +4% to +5%, 8-bit
activations with a scale per 32 inputs +0.8% (docs/benchmarks.md).

The weights are stored interleaved for the kernel (GROUP_OUT outputs x 4 inputs per 32 bytes; see
int8_blocks.c); codes() gives them back as [out, in]. The kernels compute, per row and output,
acc = acc + isum_b * x_scale_b over the blocks in order, then acc * scale (+ bias): _forward_torch
is that computation in torch, the reference the tests hold the kernels to, bit for bit. The layer
needs the native kernels to run at speed: the torch path computes every block's sums separately.
"""

import torch

from tokenforge.model.layers.block_layout import BLOCK, GROUP_OUT, deinterleave, fits, interleave
from tokenforge.model.layers.quant_linear import Int8Linear, quantize_rows

BLOCK_DIGITS = 3  # the kernels' activation kind for these layers (struct int8_row_args.digits)
TORCH_SLICE = 4096  # outputs per slice of the torch path's exact float64 sums



class Int8BlockLinear(Int8Linear):
    ACTIVATION_KINDS = (BLOCK_DIGITS,)
    INTERLEAVED = True
    INT_MM_PATH = False

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if not fits(weight):
            raise ValueError(f"a w8a8-block layer needs an output width that is a multiple of {GROUP_OUT} and an "
                             f"input width that is a multiple of {BLOCK}, not {tuple(weight.shape)}")
        super().__init__(weight, bias, activation_digits=BLOCK_DIGITS)

    def _store_weights(self, weight: torch.Tensor) -> None:
        codes, scales = quantize_rows(weight)
        self.register_buffer("weight", interleave(codes))
        self.register_buffer("scales", scales.view(1, -1))

    def codes(self) -> torch.Tensor:
        return deinterleave(self.weight)

    def first_outputs(self, num_outputs: int) -> Int8Linear:
        raise TypeError("first_outputs needs an Int8Linear, not Int8BlockLinear")

    def _forward_native(self, rows: torch.Tensor, use_int_mm: bool | None = None) -> torch.Tensor:
        """All in C (there is no _int_mm path for block scales)."""
        num_rows = rows.shape[0]
        out = torch.empty((num_rows, self.out_features), dtype=torch.float32)
        scratch = torch.empty((2 * num_rows, self.in_features), dtype=torch.int8)
        self._rows_call().rows_linear(rows.data_ptr(), out.data_ptr(), num_rows, self._row_args.address,
                                      scratch.data_ptr(), 0)
        return out

    def _forward_torch(self, rows: torch.Tensor) -> torch.Tensor:
        num_rows, num_blocks = rows.shape[0], self.in_features // BLOCK
        blocks = rows.float().reshape(num_rows, num_blocks, BLOCK)
        x_scales = blocks.abs().amax(dim=2).clamp(min=1e-12) / 127  # [rows, blocks]
        q = torch.round(blocks / x_scales.unsqueeze(2)).double().transpose(0, 1)  # [blocks, rows, BLOCK]
        codes = self.codes()
        acc = torch.empty(num_rows, self.out_features)
        for start in range(0, self.out_features, TORCH_SLICE):
            w = codes[start:start + TORCH_SLICE].double().view(-1, num_blocks, BLOCK).permute(1, 2, 0)
            sums = torch.bmm(q, w).float()  # [blocks, rows, outputs]: exact integers (|sum| < 2^24)
            part = torch.zeros(num_rows, w.shape[2])
            for b in range(num_blocks):  # in block order, mul and add rounded separately, as the kernel
                part = part + sums[b] * x_scales[:, b:b + 1]
            acc[:, start:start + TORCH_SLICE] = part
        out = acc * self.scales
        if self.bias is not None:
            out = out + self.bias
        return out
