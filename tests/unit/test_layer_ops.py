"""The fused native layer ops (layers/native/layer_ops.c) against the torch ops they replace:
the same values to fp32 rounding, and a row's bits never depend on the rows beside it (a query
verified inside a chunk of drafts gets the bits of the same query decoded alone)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tokenforge.model.layers.attention import AttentionMetadata, kv_cache_shape, paged_attention, write_kv
from tokenforge.model.layers.native import layer_ops
from tokenforge.model.layers.norm import RMSNorm
from tokenforge.model.layers.rotary import RotaryEmbedding, apply_rotary
from tokenforge.worker.batch import SequenceChunk, build_batch

pytestmark = pytest.mark.skipif(layer_ops() is None, reason="no native kernels (needs x86-64 with AVX2 and cc)")


def test_add_norm_matches_torch_and_each_row_alone():
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(100, 1e-5)  # a width that is not a multiple of 8: the tail path
    norm.weight.data = torch.rand(100, generator=generator) + 0.5
    x, delta = torch.randn(7, 100, generator=generator) * 3, torch.randn(7, 100, generator=generator)
    with torch.inference_mode():
        summed, out = norm.add_norm(x.clone(), delta)
        torch.testing.assert_close(summed, x + delta, rtol=0, atol=0)
        torch.testing.assert_close(out, norm(x + delta), rtol=1e-5, atol=1e-6)
        for i in range(7):
            assert torch.equal(norm.add_norm(x[i:i + 1].clone(), delta[i:i + 1])[1], out[i:i + 1])
        _, alone = norm.add_norm(x.clone(), None)
        torch.testing.assert_close(alone, norm(x), rtol=1e-5, atol=1e-6)


def test_silu_mul_matches_torch_and_each_row_alone():
    ops = layer_ops()
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(5, 2 * 83, generator=generator) * 6  # large gates: exp far from 1
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    out = torch.empty(5, 83)
    ops.silu_mul(gate_up.data_ptr(), 5, 83, out.data_ptr(), 2)
    gate, up = gate_up.split(83, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, rtol=2e-6, atol=1e-6)
    row = torch.empty(1, 83)
    ops.silu_mul(gate_up[3:4].contiguous().data_ptr(), 1, 83, row.data_ptr(), 1)
    assert torch.equal(row, out[3:4])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_rotary_write_kv_matches_torch(cache_dtype):
    ops = layer_ops()
    heads, kv_heads, head_dim, tokens = 6, 2, 64, 5
    rotary = RotaryEmbedding(head_dim, 64, 10000.0)
    positions = torch.tensor([0, 3, 7, 8, 40])
    cos, sin = rotary.lookup(positions, torch.float32)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim)
    cache = torch.zeros(kv_cache_shape(4, 16, kv_heads, head_dim), dtype=cache_dtype)
    slots = torch.tensor([0, 5, 17, 33, 63])
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    expected_q = apply_rotary(q.reshape(tokens, heads, head_dim), cos, sin)
    expected_k = apply_rotary(k.reshape(tokens, kv_heads, head_dim), cos, sin)
    expected_cache = cache.clone()
    write_kv(expected_cache, expected_k, v.reshape(tokens, kv_heads, head_dim), slots)
    native = qkv.clone()
    ops.rotary_write_kv(native.data_ptr(), tokens, heads, kv_heads, head_dim, cos.data_ptr(), sin.data_ptr(),
                        cache.data_ptr(), cache_dtype == torch.float16, 16, slots.data_ptr(), 2)
    torch.testing.assert_close(native[:, :heads * head_dim].view(tokens, heads, head_dim), expected_q)
    if cache_dtype == torch.float32:
        torch.testing.assert_close(cache, expected_cache)
    else:  # the rotated k and v, each rounded to nearest fp16 as torch rounds them
        native_kv = native[:, heads * head_dim:].view(tokens, 2, kv_heads, head_dim)
        assert torch.equal(cache[slots // 16, :, :, slots % 16], native_kv.to(torch.float16))
        torch.testing.assert_close(cache.float(), expected_cache.float(), rtol=1e-3, atol=1e-3)


def attention(q, cache, chunks, native: bool) -> torch.Tensor:
    meta = build_batch(chunks, cache.shape[3], torch.device("cpu")).meta
    if not native:
        meta = dataclasses.replace(meta, num_native_tokens=0)  # every token on the torch path
    k = v = torch.empty(0)  # unused: the cache holds every chunk's K/V already
    return paged_attention(q, k, v, cache, meta, 0.125)


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (8, 1, 40), (4, 4, 16), (14, 2, 24)])
def test_paged_attention_matches_sdpa_and_each_query_equals_its_decode(cache_dtype, heads, kv_heads, head_dim):
    """Groups of 3, 8, 1 and 7 query heads per KV head (the kernel takes up to 3 heads at a time);
    head sizes in steps of 32 floats, of 8, and both."""
    generator = torch.Generator().manual_seed(2)
    block_size = 4
    cache = torch.randn(kv_cache_shape(32, block_size, kv_heads, head_dim), generator=generator).to(cache_dtype)
    tables = [[3, 9, 1, 4, 20], [7, 2, 30, 11, 12, 13, 14, 15, 16, 17], [5, 6, 8, 10, 18, 19, 21, 22]]
    chunks = [
        SequenceChunk([1], 17, tables[0]),  # a decode at position 17
        SequenceChunk([1] * 5, 33, tables[1]),  # five tokens to verify, positions 33-37
        SequenceChunk([1] * 20, 4, tables[2]),  # a prefill chunk, positions 4-23
    ]
    q = torch.randn(26, heads, head_dim, generator=generator)
    with torch.inference_mode():
        native = attention(q, cache, chunks, native=True)
        reference = attention(q, cache, chunks, native=False)
        torch.testing.assert_close(native, reference, rtol=1e-5, atol=1e-5)
        # each verified query and each prompt query, decoded alone: the same bits
        for first, positions, table in ((1, range(33, 38), tables[1]), (6, range(4, 24), tables[2])):
            for i, position in enumerate(positions):
                alone = attention(q[first + i:first + i + 1], cache, [SequenceChunk([1], position, table)], native=True)
                assert torch.equal(alone, native[first + i:first + i + 1])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_many_decodes_match_sdpa_and_each_decoded_alone(cache_dtype):
    """From 4 queries a thread on, a task takes all heads of one query (another split of the work):
    the same bits as a query decoded alone."""
    generator = torch.Generator().manual_seed(3)
    block_size, heads, kv_heads, head_dim = 16, 9, 3, 64
    cache = torch.randn(kv_cache_shape(40, block_size, kv_heads, head_dim), generator=generator).to(cache_dtype)
    positions = [3, 17, 40, 63, 15, 5, 31, 47, 50, 12]  # within, at and over block edges
    tables = [[4 * i + 3 - b for b in range(4)] for i in range(len(positions))]  # blocks in no order
    chunks = [SequenceChunk([1], position, table) for position, table in zip(positions, tables)]
    q = torch.randn(len(chunks), heads, head_dim, generator=generator)
    with torch.inference_mode():
        native = attention(q, cache, chunks, native=True)
        torch.testing.assert_close(native, attention(q, cache, chunks, native=False), rtol=1e-5, atol=1e-5)
        for i, chunk in enumerate(chunks):
            assert torch.equal(attention(q[i:i + 1], cache, [chunk], native=True), native[i:i + 1])
