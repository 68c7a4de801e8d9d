"""int8 linear layers: codes within half a step of the weights; with 16-bit activations the layer
equals a matmul with its dequantized weights to ~15 bits (bias, any leading shape, outliers); with
int8 ones (w8a8) it equals the matmul of the rounded activations; every native path gives the torch
path's bits (int8 and 4-bit layers); quantize_model replaces every linear and a tied head."""

import time

import pytest
import torch
from torch import nn

from tokenforge.model.layers import quant_linear
from tokenforge.model.layers import native
from tokenforge.model.layers.native import int8_kernels
from tokenforge.model.layers.quant_int4 import Int4Linear
from tokenforge.model.layers.quant_linear import Int8Embedding, Int8Linear, quantize_rows
from tokenforge.model.layers.quantize import quantize_model


def make_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[0, 3] = 1.5  # an outlier: its row's scale is larger, the other rows' are not
    return weight


def test_int8_codes_round_to_within_half_a_step():
    weight = make_weight(64, 96)
    codes, scales = quantize_rows(weight)
    assert codes.dtype == torch.int8 and scales.shape == (64, 1)
    assert codes.abs().max() == 127
    assert ((codes.float() * scales - weight).abs() <= scales / 2 + 1e-7).all()
    assert scales[0] > 5 * scales[1:].max()  # the outlier widens its own row only


@pytest.mark.parametrize("num_rows", [1, 7, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_equals_a_matmul_with_its_dequantized_weight(num_rows, bias):
    weight = make_weight(300, 576)
    b = torch.randn(300) if bias else None
    layer = Int8Linear(weight, b)
    codes, scales = quantize_rows(weight)
    x = torch.randn(num_rows, 2, 576)
    x[0, 0, 5] = 40.0  # an activation outlier: the other channels keep their precision
    expected = x @ (codes.float() * scales).T + (b if bias else 0)
    out = layer(x)
    assert out.shape == (num_rows, 2, 300)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=2e-3)
    exact = (x @ weight.T + (b if bias else 0))[..., 1:]  # row 0, with its outlier, has coarse steps
    assert (out[..., 1:] - exact).norm() / exact.norm() < 0.01  # and close to the fp32 layer


def test_w8a8_linear_is_the_matmul_of_rounded_activations():
    weight = make_weight(256, 576)
    layer = Int8Linear(weight, None, activation_digits=1)
    codes, scales = quantize_rows(weight)
    x = torch.randn(5, 576)
    x_scales = x.abs().amax(dim=1, keepdim=True) / 127
    x_rounded = torch.round(x / x_scales) * x_scales
    torch.testing.assert_close(layer(x), x_rounded @ (codes.float() * scales).T, rtol=1e-4, atol=1e-4)
    two_digits = Int8Linear(weight, None)(x)
    exact = x @ (codes.float() * scales).T
    assert (two_digits - exact).abs().max() < (layer(x) - exact).abs().max() / 20


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(100, 64)
        self.block = nn.Sequential(nn.Linear(64, 128), nn.SiLU(), nn.Linear(128, 64, bias=False))
        self.lm_head = None  # tied to embed_tokens


@pytest.mark.parametrize("method", ["int8", "w8a8"])
def test_quantize_model_replaces_every_linear_and_the_tied_head(method):
    model = Tiny()
    embedding = model.embed_tokens.weight.detach().clone()
    assert quantize_model(model, method) == 3
    digits = 2 if method == "int8" else 1
    layers = [model.block[0], model.block[2], model.lm_head]
    assert all(isinstance(layer, Int8Linear) and layer.activation_digits == digits for layer in layers)
    assert model.block[0].bias is not None and model.block[2].bias is None
    # The embedding shares the head's codes (held once) and looks rows up from them.
    assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.weight is model.lm_head.weight
    ids = torch.tensor([0, 7, 99, 7])
    looked_up = model.embed_tokens(ids)
    assert torch.equal(looked_up, model.lm_head.weight[ids].float() * model.lm_head.scales.view(-1, 1)[ids])
    step = embedding.abs().amax(dim=1, keepdim=True)[ids] / 127  # one int8 step of each row
    assert ((looked_up - embedding[ids]).abs() <= step / 2 + 1e-7).all()
    assert not any(isinstance(m, (nn.Linear, nn.Embedding)) for m in model.modules())


def test_an_untied_model_gets_its_own_int8_embedding():
    model = Tiny()
    model.lm_head = nn.Linear(64, 100, bias=False)
    embedding = model.embed_tokens.weight.detach().clone()
    assert quantize_model(model, "int8") == 3
    assert isinstance(model.embed_tokens, Int8Embedding) and model.embed_tokens.weight is not model.lm_head.weight
    codes, scales = quantize_rows(embedding)
    assert torch.equal(model.embed_tokens(torch.tensor([3])), codes[3:4].float() * scales[3:4])


def test_quantize_model_none_and_unknown():
    model = Tiny()
    assert quantize_model(model, "none") == 0 and isinstance(model.block[0], nn.Linear)
    with pytest.raises(ValueError, match="unknown quantization"):
        quantize_model(model, "int3")


def kernels_of(build: str):
    """The int8 kernels of a build: "default" (compile_flags(): AVX-512 VNNI tiles where the CPU has
    them) or "avx2" (FLAGS only: the AVX2 loops, tested here too where the default is the other)."""
    if int8_kernels() is None:
        pytest.skip("no native kernels on this machine (needs x86-64 with AVX2 and a C compiler)")
    if build == "default":
        return int8_kernels()
    if native.compile_flags() == native.FLAGS:
        pytest.skip("the default build is the AVX2 one on this machine")
    return int8_kernels(native.FLAGS)


@pytest.mark.parametrize("build", ["default", "avx2"])
@pytest.mark.parametrize("digits", [1, 2])
@pytest.mark.parametrize("in_features, out_features, bias",
                         [(96, 64, False), (576, 960, True), (1536, 578, False), (2080, 65, True)])
@pytest.mark.parametrize("num_rows", [1, 2, 5, 8, 9, 19])
@pytest.mark.parametrize("int_mm", [True, False])  # many rows: around _int_mm, or all in C
@pytest.mark.parametrize("layer_class", [Int8Linear, Int4Linear])
def test_the_native_kernels_give_the_torch_paths_bits(build, digits, in_features, out_features, bias, num_rows,
                                                      int_mm, layer_class, monkeypatch):
    """Rows go through the native kernels (AVX2: one row, a few rows in one pass, many rows in C
    tiles of 3 outputs x 4 rows; AVX-512 VNNI: tiles of 4 outputs x up to 6 rows; or around _int_mm);
    they must give exactly the torch path's result, so that an output does not depend on the batch it
    ran in. 4-bit layers take the same paths on the codes they expand. The shapes leave partial tiles
    and cross the kernels' int32 widening (2048 inputs)."""
    kernels = kernels_of(build)
    generator = torch.Generator().manual_seed(1)
    monkeypatch.setattr(quant_linear, "int_mm_is_faster", lambda num_rows=64: int_mm)
    layer = layer_class(make_weight(out_features, in_features), torch.randn(out_features) if bias else None,
                        activation_digits=digits)
    assert layer.kernels is not None
    layer.kernels = kernels
    check_native_bits(layer, sample_rows(num_rows, in_features, generator))


def sample_rows(num_rows: int, in_features: int, generator: torch.Generator) -> torch.Tensor:
    """Random rows with a row of zeros, a tiny row and one row of an outlier's scale."""
    rows = torch.randn(num_rows, in_features, generator=generator) * 50.0
    rows[0] = torch.zeros(in_features)
    rows[-1] = make_weight(1, in_features, seed=5)
    if num_rows > 2:
        rows[1] *= 1e-5
    return rows


def check_native_bits(layer: Int8Linear, rows: torch.Tensor) -> None:
    """The layer's native paths give its torch path's bits: the batch, each row alone, and the rows
    kernel of the one-call decode from 1 to 10 rows."""
    num_rows, in_features = rows.shape
    with torch.inference_mode():
        native = layer(rows)
        reference = layer._forward_torch(rows)
        assert torch.equal(native, reference)
        for i in range(num_rows):  # each row alone: the same bits as inside the batch
            assert torch.equal(layer(rows[i:i + 1]), native[i:i + 1])
        call = layer._row_args
        for count in range(1, min(num_rows, 10) + 1):
            out = torch.empty(count, layer.out_features)
            codes, x_scales = torch.empty(2 * count * in_features, dtype=torch.int8), torch.empty(count)
            layer.kernels.rows_linear(rows.data_ptr(), out.data_ptr(), count, call.address, codes.data_ptr(),
                                      x_scales.data_ptr())
            assert torch.equal(out, native[:count])


@pytest.mark.parametrize("build", ["default", "avx2"])
@pytest.mark.parametrize("num_rows", [1, 6, 12])
def test_native_sums_of_the_largest_codes_do_not_overflow(build, num_rows, monkeypatch):
    """Every product at its largest (127 * 32767) over 8192 inputs: the sums exceed int32, also in each
    int32 lane without the kernels' widening, and must still be exact in every kernel."""
    kernels = kernels_of(build)
    monkeypatch.setattr(quant_linear, "int_mm_is_faster", lambda num_rows=64: False)
    weight = torch.ones(7, 8192)
    weight[3] = -1.0
    layer = Int8Linear(weight, None)
    layer.kernels = kernels
    rows = torch.full((num_rows, 8192), 2.0)
    with torch.inference_mode():
        out = layer(rows)
        assert torch.equal(out, layer._forward_torch(rows))
    assert torch.allclose(out[:, 3], torch.full((num_rows,), -16384.0))
    assert torch.allclose(out[:, 0], torch.full((num_rows,), 16384.0))


def test_no_native_kernel_when_switched_off_or_the_width_does_not_fit(monkeypatch):
    assert Int8Linear(make_weight(8, 40), None).kernels is None  # 40 is not a multiple of 32
    int8_kernels.cache_clear()
    monkeypatch.setenv("TOKENFORGE_NATIVE_KERNELS", "0")
    try:
        assert int8_kernels() is None and Int8Linear(make_weight(8, 64), None).kernels is None
    finally:
        int8_kernels.cache_clear()


def test_decode_sizes_keep_the_c_loop_unless_int_mm_wins_by_the_margin(monkeypatch):
    """Up to DECODE_ROWS rows the C loop (and DecodePlan's one call a step) stays unless _int_mm measures
    INT_MM_MARGIN faster; more rows take whichever is faster."""
    if int8_kernels() is None:
        pytest.skip("no native kernels on this machine (needs x86-64 with AVX2 and a C compiler)")
    speedup = quant_linear._int_mm_speedup(quant_linear.DECODE_ROWS, calls=1)  # the real measurement
    assert 0.0 < speedup < float("inf")
    for measured, decode, prefill in ((1.3, False, True), (0.9, False, False), (1.6, True, True)):
        monkeypatch.setattr(quant_linear, "_int_mm_speedup", lambda num_rows, m=measured: m)
        assert quant_linear.int_mm_is_faster(quant_linear.DECODE_ROWS) is decode
        assert quant_linear.int_mm_is_faster(8 * quant_linear.DECODE_ROWS) is prefill


@pytest.mark.parametrize("int_mm_s, c_s, expected_calls", [(0.4, 0.002, 1), (0.002, 0.4, 1), (0.02, 0.02, 19)])
def test_the_speedup_is_settled_by_one_call_each_where_the_paths_are_far_apart(monkeypatch, int_mm_s, c_s,
                                                                                expected_calls):
    """One call of each path 200x apart decides at once (on an AMD EPYC the full rounds of _int_mm took
    9-12 s, on a server's first request); paths of one speed get the alternated rounds (1 + 3 x 6 calls)."""
    calls = {True: 0, False: 0}

    def forward(layer, rows, use_int_mm=None):
        calls[use_int_mm] += 1
        time.sleep(int_mm_s if use_int_mm else c_s)
        return rows

    monkeypatch.setattr(Int8Linear, "_forward_native", forward)
    quant_linear._int_mm_speedup.cache_clear()
    try:
        speedup = quant_linear._int_mm_speedup(7)
    finally:
        quant_linear._int_mm_speedup.cache_clear()
    assert calls == {True: expected_calls, False: expected_calls}
    if expected_calls == 1:
        assert (speedup > quant_linear.CLEAR_RATIO) == (c_s > int_mm_s)
