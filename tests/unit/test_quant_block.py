"""w8a8-block layers: 8-bit activations with a scale per block of 32 inputs. The native kernels give
the torch reference's bits for any number of rows (so a row's output never depends on its batch);
the layer is the matmul of the block-rounded activations with the dequantized weights; an outlier
costs only its own block's precision (one scale per row, w8a8, loses the whole row's); the stored
order round-trips, and a tied embedding looks its rows up in it."""

import pytest
import torch
from torch import nn

from tokenforge.model.layers.block_layout import deinterleave, interleave, stored_rows
from tokenforge.model.layers.quant_block import BLOCK, Int8BlockLinear
from tokenforge.model.layers.quant_linear import Int8Embedding, Int8Linear, quantize_rows
from tokenforge.model.layers.quantize import quantize_model
from tests.unit.test_quant_linear import check_native_bits, kernels_of, make_weight, sample_rows


def block_rounded(x: torch.Tensor) -> torch.Tensor:
    """x with each block of BLOCK inputs rounded to int8 steps of its own scale, in fp32."""
    blocks = x.view(x.shape[0], -1, BLOCK)
    scales = blocks.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / 127
    return (torch.round(blocks / scales) * scales).view(x.shape)


@pytest.mark.parametrize("build", ["default", "avx2"])
@pytest.mark.parametrize("in_features, out_features, bias",
                         [(96, 64, False), (576, 960, True), (1536, 576, False), (2080, 72, True)])
@pytest.mark.parametrize("num_rows", [1, 2, 5, 9, 19])
def test_the_native_kernels_give_the_torch_paths_bits(build, in_features, out_features, bias, num_rows):
    """One row, tiles of 8 outputs x up to 4 rows (16 outputs, two at a time, x 8 rows with AVX-512
    VNNI's vpdpbusd, the default build where the CPU has it; 72 outputs: an odd group alone) with a
    partial last tile, and the rows kernel of the one-call decode from 1
    to 10 rows: all exactly the reference's result."""
    kernels = kernels_of(build)
    generator = torch.Generator().manual_seed(2)
    layer = Int8BlockLinear(make_weight(out_features, in_features), torch.randn(out_features) if bias else None)
    layer.kernels = kernels
    rows = sample_rows(num_rows, in_features, generator)
    rows[-1, :BLOCK] = 0.0  # a block of zeros beside blocks of values
    check_native_bits(layer, rows)


def test_the_layer_is_the_matmul_of_block_rounded_activations():
    weight = make_weight(64, 256)
    layer = Int8BlockLinear(weight, None)
    codes, scales = quantize_rows(weight)
    x = torch.randn(7, 256, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = layer(x)
    expected = block_rounded(x) @ (codes.float() * scales).T
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_an_outlier_costs_only_its_own_block():
    """A channel 100x larger than the rest (as LLM activations have): with one scale per row (w8a8)
    every other input loses its precision; with block scales only the outlier's block does."""
    weight = make_weight(64, 512)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(4))
    x[:, 7] = 300.0
    exact = x @ weight.T
    with torch.inference_mode():
        block_error = (Int8BlockLinear(weight, None)(x) - exact).norm()
        row_error = (Int8Linear(weight, None, activation_digits=1)(x) - exact).norm()
    assert block_error < row_error / 3, (block_error, row_error)


def test_the_stored_order_round_trips_and_gives_rows_back():
    codes = torch.randint(-127, 128, (48, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    stored = interleave(codes)
    assert not torch.equal(stored, codes) and torch.equal(deinterleave(stored), codes)
    assert torch.equal(stored[0, :32], codes[:8, :4].reshape(-1))  # the kernel's first 32 bytes
    ids = torch.tensor([[0, 7, 47], [8, 8, 23]])
    assert torch.equal(stored_rows(stored, ids), codes[ids])


class Tiny(nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, 64)
        self.block = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 60, bias=False))
        self.lm_head = None  # tied to embed_tokens


def test_quantize_model_shares_the_stored_head_with_the_embedding_and_keeps_odd_widths_int8():
    model = Tiny(vocab=104)
    embedding = model.embed_tokens.weight.detach().clone()
    assert quantize_model(model, "w8a8-block") == 3
    assert type(model.block[0]) is Int8BlockLinear and type(model.lm_head) is Int8BlockLinear
    assert type(model.block[2]) is Int8Linear  # 60 outputs: not a multiple of 8
    assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.weight is model.lm_head.weight
    ids = torch.tensor([0, 7, 103, 7])
    codes, scales = quantize_rows(embedding)
    assert torch.equal(model.embed_tokens(ids), codes[ids].float() * scales[ids])
    with pytest.raises(ValueError, match="multiple of 8"):
        Int8BlockLinear(torch.zeros(60, 64), None)
