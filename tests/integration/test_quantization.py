"""Quantized SmolLM2 on the fixed text (tokenforge/bench/perplexity.txt): int8 keeps the perplexity
within 1% of fp32 (issue 5's bar), and so does w8a8-block (8-bit activations with a scale per 32
inputs); w8a8 (one scale per row) within 6% (it also rounds activations to 8 bits, which makes
its figure swing with the last bits of the fp32 ops around it: +3.2% to +4.3% in earlier sessions,
+5.04% on an Intel Xeon with AVX-512 where the torch-only path gives +4.16%; docs/benchmarks.md);
a quantized engine generates through the whole stack; and "auto" picks w8a8-block (int8 where the
AVX-512 VNNI tiles are built) for an already quantized GGUF on the CPU only."""


import pytest
import torch

from tokenforge.bench.perplexity import fixed_text, perplexity
from tokenforge.config import ModelConfig
from tokenforge.engine.factory import load, pick_quantization
from tokenforge.errors import ConfigError
from tokenforge.engine.llm import LLM
from tokenforge.model.layers.native import int8_kernels
from tokenforge.model.layers.quant_block import Int8BlockLinear
from tokenforge.model.layers.quant_int4 import Int4Linear
from tokenforge.model.layers.quant_linear import Int8Linear
from tokenforge.model.layers.quantize import quantize_model
from tokenforge.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def fp32_perplexity(smollm2_loaded):
    loaded = smollm2_loaded[0]
    return perplexity(loaded.model, loaded.tokenizer.encode(fixed_text()))


@pytest.mark.parametrize("method, max_increase", [("int8", 0.01), ("w8a8-block", 0.01), ("w8a8", 0.06)])
def test_quantized_perplexity_stays_close_to_fp32(smollm2_path, fp32_perplexity, method, max_increase):
    loaded, _, _ = load(ModelConfig(model=str(smollm2_path), quantization=method, device="cpu"))
    quantized = perplexity(loaded.model, loaded.tokenizer.encode(fixed_text()))
    assert 5 < fp32_perplexity < 50  # a sane model on plain English
    assert fp32_perplexity <= quantized * 1.001  # rounding the weights does not help it
    assert quantized <= fp32_perplexity * (1 + max_increase), (method, quantized, fp32_perplexity)


def test_an_int8_engine_generates_and_prices_by_the_loaded_parameters(smollm2_path, smollm2_loaded):
    llm = LLM(str(smollm2_path), quantization="int8", device="cpu", kv_cache_memory_bytes=64 * 2**20)
    assert any(isinstance(m, Int8Linear) for m in llm.engine.runner.model.modules())
    assert llm.engine.num_params == smollm2_loaded[0].num_params  # not the int8 buffers' count
    out = llm.generate(["The capital of France is", "def add(a, b):"],
                       SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [12, 12]
    assert "Paris" in out[0].outputs[0].text


def test_auto_quantizes_an_already_quantized_gguf_on_the_cpu_only(smollm2_path):
    loaded, _, _ = load(ModelConfig(model=str(smollm2_path), device="cpu"))  # quantization="auto"
    assert loaded.quantized_source  # the pulled file is Q4_1
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # 8-bit products in blocks wherever the native kernels run (AVX2 or AVX-512 VNNI builds)
    assert pick_quantization("auto", cpu, True) == "w8a8-block"
    layers = [m for m in loaded.model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 4 * loaded.model.config.num_layers + 1 and all(type(m) is Int8BlockLinear for m in layers)
    assert pick_quantization("auto", cuda, loaded.quantized_source) == "none"
    assert pick_quantization("auto", cpu, False) == "none"  # fp16/fp32 files
    assert pick_quantization("w8a8", cpu, loaded.quantized_source) == "w8a8"
    with pytest.raises(ConfigError, match="CPU only"):
        pick_quantization("int8", cuda, loaded.quantized_source)


@pytest.mark.parametrize("method", ["int8", "w8a8-block", "int4"])
def test_layers_quantized_while_loading_equal_layers_quantized_after(smollm2_path, method):
    """The loader quantizes each linear layer as soon as its weights are in (the fp32 model never
    exists whole): the result must be the layers quantize_model makes from the fp32 model."""
    streamed, _, _ = load(ModelConfig(model=str(smollm2_path), quantization=method, device="cpu"))
    after, _, _ = load(ModelConfig(model=str(smollm2_path), quantization="none", device="cpu"))
    quantize_model(after.model, method)
    assert not any(isinstance(m, torch.nn.Linear) for m in streamed.model.modules())
    assert streamed.num_params == after.num_params
    buffers = dict(after.model.named_buffers())
    for name, buffer in streamed.model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    params = dict(after.model.named_parameters())
    for name, param in streamed.model.named_parameters():
        assert torch.equal(param, params[name]), name


def test_int4_perplexity_is_stated_and_an_int4_engine_generates(smollm2_path, fp32_perplexity):
    """4-bit layers with an int8 head: +14% on the fixed text (docs/benchmarks.md), in Q4_0's
    class; the bound catches a broken quantizer or kernel, not the exact figure."""
    llm = LLM(str(smollm2_path), quantization="int4", device="cpu", kv_cache_memory_bytes=64 * 2**20)
    model = llm.engine.runner.model
    assert sum(isinstance(m, Int4Linear) for m in model.modules()) == 4 * model.config.num_layers
    assert type(model.lm_head) is Int8Linear
    quantized = perplexity(model, llm.tokenizer.encode(fixed_text()))
    assert fp32_perplexity * 1.03 < quantized < fp32_perplexity * 1.25, (quantized, fp32_perplexity)
    out = llm.generate(["The capital of France is", "def add(a, b):"],
                       SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]
    assert all(o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids) for o in out)


def test_int4_and_w8a8_block_need_the_native_kernels_and_auto_falls_back_to_int8(monkeypatch):
    int8_kernels.cache_clear()
    monkeypatch.setenv("TOKENFORGE_NATIVE_KERNELS", "0")
    try:
        for method in ("int4", "w8a8-block"):
            with pytest.raises(ConfigError, match=f"{method} needs the native kernels"):
                pick_quantization(method, torch.device("cpu"), True)
        assert pick_quantization("auto", torch.device("cpu"), True) == "int8"
    finally:
        int8_kernels.cache_clear()
