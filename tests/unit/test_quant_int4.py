"""4-bit linear layers: the codes are the documented integers of the packed indices and
multipliers, each group's rounding error is within its own step (mostly half of it), the C expansion equals the
torch one, and every native path gives the torch path's bits (so an output never depends on its
batch); quantize_model keeps the head int8 under int4."""

import pytest
import torch
from torch import nn

from tokenforge.model.layers.native import int8_kernels
from tokenforge.model.layers.quant_int4 import LEVELS, Int4Linear, quantize_groups, unpack_codes
from tokenforge.model.layers.quant_linear import Int8Embedding, Int8Linear
from tokenforge.model.layers.quantize import linear_quantizer, quantize_model


def make_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[0, 3] = 1.5  # an outlier: its group's step is large, its row's other groups keep theirs
    weight[1, 32:64] *= 0.01  # a group far below its row's largest weight
    return weight


def needs_kernels():
    if int8_kernels() is None:
        pytest.skip("no native kernels on this machine (needs x86-64 with AVX2 and a C compiler)")


def test_codes_are_the_levels_times_the_multipliers():
    needs_kernels()
    weight = make_weight(8, 64)
    packed, multipliers, scales = quantize_groups(weight)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert multipliers.shape == (8, 2) and multipliers.dtype == torch.int8 and scales.shape == (8, 1)
    codes = unpack_codes(packed, multipliers)
    for row, group, i in [(0, 0, 3), (1, 1, 0), (5, 1, 31), (7, 0, 17)]:
        byte = int(packed[row, group * 16 + i % 16])
        index = byte & 15 if i < 16 else byte >> 4
        u = int(multipliers[row, group])
        assert int(codes[row, group * 32 + i]) == (int(LEVELS[index]) * u + 64) >> 7
    assert codes.abs().max() <= 127


def test_each_group_rounds_within_its_own_step():
    needs_kernels()
    weight = make_weight(64, 256)
    packed, multipliers, scales = quantize_groups(weight)
    dequantized = unpack_codes(packed, multipliers).float() * scales
    error = (dequantized - weight).abs().view(64, 8, 32)
    step = (multipliers.float().abs() * 16 / 128 + 1).unsqueeze(2) * scales.view(64, 1, 1)  # levels ~16u/128 apart
    # Half a step, except near the group's top: the grid ends at 111 / 127 of the largest weight's
    # side (as Q4_0's does), and the quantizer may trade a clipped weight for a finer step.
    assert (error <= step + 1e-6).all() and (error <= step / 2 + 1e-6).float().mean() > 0.99
    # The small group of row 1 gets a small multiplier: its error is far below the row's step.
    assert multipliers[1, 1].abs() < multipliers[1, 0].abs() / 10
    assert error[1, 1].max() < error[1, 0].max() / 5
    relative = (dequantized - weight).norm() / weight.norm()
    assert 0.02 < relative < 0.15  # 4 bits: coarser than int8's ~0.5%, and not broken


def test_the_c_expansion_equals_the_torch_one():
    needs_kernels()
    layer = Int4Linear(make_weight(96, 576, seed=3), None)
    with torch.inference_mode():
        assert torch.equal(layer._native_codes(), layer.codes())


@pytest.mark.parametrize("digits", [1, 2])
def test_a_4bit_layer_is_coarser_than_int8_and_close_to_fp32(digits):
    """The bits of every native path against the torch path: test_quant_linear.py, for both layers."""
    needs_kernels()
    weight, x = make_weight(576, 1536), torch.randn(8, 1536, generator=torch.Generator().manual_seed(2))
    exact = x @ weight.T
    with torch.inference_mode():
        int4 = Int4Linear(weight, None, activation_digits=digits)(x)
        int8 = Int8Linear(weight, None, activation_digits=digits)(x)
    assert ((int4 - exact).norm() / exact.norm()).item() < 0.15
    assert (int8 - exact).norm() < (int4 - exact).norm()


class Tiny(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 64)
        self.block = nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, 64, bias=False))
        self.lm_head = None  # tied to embed_tokens


def test_int4_keeps_the_head_and_odd_widths_in_int8():
    needs_kernels()
    model = Tiny(width=48)  # block[2] reads 48 inputs: not a whole number of groups
    assert quantize_model(model, "int4") == 3
    assert type(model.block[0]) is Int4Linear and type(model.block[2]) is Int8Linear
    assert type(model.lm_head) is Int8Linear and model.lm_head.activation_digits == 2
    assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.weight is model.lm_head.weight
    make = linear_quantizer("int4")
    assert type(make("model.lm_head", nn.Linear(64, 100))) is Int8Linear
    assert type(make("layers.0.mlp.down_proj", nn.Linear(64, 100))) is Int4Linear


def test_a_width_that_is_not_whole_groups_is_refused():
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_groups(torch.randn(4, 40))


def test_each_weight_takes_the_nearest_code_of_its_groups_multiplier():
    needs_kernels()
    weight = make_weight(48, 576, seed=4)
    packed, multipliers, scales = quantize_groups(weight)
    codes = unpack_codes(packed, multipliers).float().view(48, 18, 32)
    x = (weight / scales).view(48, 18, 32)
    all_codes = torch.div(LEVELS.view(1, 1, 16) * multipliers.int().unsqueeze(2) + 64, 128, rounding_mode="floor")
    nearest = (x.unsqueeze(-1) - all_codes.float().unsqueeze(2)).abs().min(dim=-1).values
    assert torch.allclose((codes - x).abs(), nearest, atol=1e-4)
