"""The stored order of w8a8-block weights (quant_block.py, native/int8_blocks.c): GROUP_OUT outputs
x 4 inputs per 32 bytes, [N / 8, K / 4, 8, 4], kept as an [N, K] tensor."""

import torch

BLOCK = 32  # inputs per activation scale
GROUP_OUT = 8  # outputs interleaved in the stored weights


def fits(weight: torch.Tensor) -> bool:
    """Whether a weight [out, in] can be a w8a8-block layer (else quantize.py keeps it int8)."""
    return weight.shape[0] % GROUP_OUT == 0 and weight.shape[1] % BLOCK == 0


def interleave(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in the kernels' order ([N / 8, K / 4, 8, 4]), as an [N, K] tensor."""
    n, k = codes.shape
    return codes.view(n // GROUP_OUT, GROUP_OUT, k // 4, 4).transpose(1, 2).contiguous().view(n, k)


def deinterleave(stored: torch.Tensor) -> torch.Tensor:
    n, k = stored.shape
    return stored.view(n // GROUP_OUT, k // 4, GROUP_OUT, 4).transpose(1, 2).contiguous().view(n, k)


def stored_rows(stored: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` (any shape) of interleaved codes, as [*ids.shape, K] (a tied embedding's lookup)."""
    n, k = stored.shape
    flat = ids.reshape(-1)
    rows = stored.view(n // GROUP_OUT, k // 4, GROUP_OUT, 4)[flat // GROUP_OUT, :, flat % GROUP_OUT, :]
    return rows.reshape(*ids.shape, k)
