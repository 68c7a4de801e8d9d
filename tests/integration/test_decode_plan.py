"""DecodePlan: single-stream decode of all layers in one native call gives exactly the bits of the
layer-by-layer path (which equals any batch's), so outputs never depend on which path ran."""

import pytest
import torch

from tokenforge.config import ModelConfig
from tokenforge.engine.factory import load
from tokenforge.model.decode_plan import MAX_PLAN_ROWS, DecodePlan
from tokenforge.model.layers import quant_linear
from tokenforge.model.layers.attention import kv_cache_shape
from tokenforge.worker.batch import SequenceChunk, build_batch

BLOCK_SIZE = 16


@pytest.fixture(scope="module", params=["int8", "int4"])
def int8_model(smollm2_path, request):
    """SmolLM2 with int8 or 4-bit linear layers (both run the plan's row kernels)."""
    model = load(ModelConfig(model=str(smollm2_path), quantization=request.param, device="cpu"))[0].model
    if DecodePlan.make(model) is None:
        pytest.skip("no native kernels on this machine (needs x86-64 with AVX2 and a C compiler)")
    return model


def decode_step(model, kv_caches, token_ids: list[int], use_plan: bool) -> torch.Tensor:
    """Prefills token_ids[:-1], then decodes the last token; the hidden state of that token."""
    model.decode_plan = None if use_plan else False
    blocks = list(range(len(token_ids) // BLOCK_SIZE + 1))
    with torch.inference_mode():
        prefill = build_batch([SequenceChunk(token_ids[:-1], 0, blocks)], BLOCK_SIZE, torch.device("cpu"))
        model(prefill.input_ids, prefill.positions, kv_caches, prefill.meta)
        step = build_batch([SequenceChunk(token_ids[-1:], len(token_ids) - 1, blocks, 1)], BLOCK_SIZE,
                           torch.device("cpu"))
        hidden = model(step.input_ids, step.positions, kv_caches, step.meta)
    assert (model.decode_plan is not False) == use_plan
    return hidden


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("length", [5, 16, 40])  # within a block, a full block, over blocks
def test_the_plan_gives_the_layer_by_layer_bits(int8_model, length, cache_dtype):
    config = int8_model.config
    shape = (config.num_layers, *kv_cache_shape(8, BLOCK_SIZE, config.num_kv_heads, config.head_dim))
    token_ids = [(17 * i + 3) % config.vocab_size for i in range(length)]
    caches = torch.zeros(shape, dtype=cache_dtype), torch.zeros(shape, dtype=cache_dtype)
    with_plan = decode_step(int8_model, caches[0], token_ids, use_plan=True)
    without = decode_step(int8_model, caches[1], token_ids, use_plan=False)
    assert torch.equal(with_plan, without)
    assert torch.equal(caches[0], caches[1])  # the same K/V written
    int8_model.decode_plan = None


def test_a_replaced_layer_makes_a_new_plan(int8_model):
    plan = DecodePlan.make(int8_model)
    assert plan.is_current(int8_model)
    layer = int8_model.layers[3].mlp
    original = layer.down_proj
    layer.down_proj = type(original)(torch.randn(original.out_features, original.in_features), None)
    try:
        assert not plan.is_current(int8_model)
    finally:
        layer.down_proj = original


@pytest.mark.parametrize("query_lengths", [[1, 1], [1, 1, 1, 1], [3], [1, 2, 1], [1] * 16, [1, 3] * 5])
def test_a_few_tokens_get_the_layer_by_layer_bits(int8_model, query_lengths, monkeypatch):
    """Decodes of a few streams and short verification chunks, up to MAX_PLAN_ROWS tokens in one call;
    more (up to MAX_PLAN_ROWS_C) where the C loop multiplies many rows (forced here for those)."""
    if sum(query_lengths) > MAX_PLAN_ROWS:
        monkeypatch.setattr(quant_linear, "int_mm_is_faster", lambda num_rows=64: False)
    config = int8_model.config
    shape = (config.num_layers, *kv_cache_shape(4 * len(query_lengths), BLOCK_SIZE, config.num_kv_heads,
                                                config.head_dim))
    caches = torch.zeros(shape, dtype=torch.float16), torch.zeros(shape, dtype=torch.float16)
    results = []
    for use_plan, kv_caches in zip((True, False), caches):
        int8_model.decode_plan = None if use_plan else False
        chunks = []
        with torch.inference_mode():
            for index, num_query in enumerate(query_lengths):  # prefill each sequence but its last tokens
                token_ids = [(13 * i + 5 * index + 1) % config.vocab_size for i in range(20 + 7 * (index % 4))]
                blocks = [4 * index + b for b in range(4)]
                prefill = build_batch([SequenceChunk(token_ids[:-num_query], 0, blocks)], BLOCK_SIZE,
                                      torch.device("cpu"))
                int8_model(prefill.input_ids, prefill.positions, kv_caches, prefill.meta)
                chunks.append(SequenceChunk(token_ids[-num_query:], len(token_ids) - num_query, blocks, num_query))
            step = build_batch(chunks, BLOCK_SIZE, torch.device("cpu"))
            results.append(int8_model(step.input_ids, step.positions, kv_caches, step.meta))
        assert isinstance(int8_model.decode_plan, DecodePlan) == use_plan  # made by this step: it ran
        assert not use_plan or int8_model.decode_plan.max_rows >= len(step.input_ids)
    assert torch.equal(results[0], results[1])
    assert torch.equal(caches[0], caches[1])
    int8_model.decode_plan = None
