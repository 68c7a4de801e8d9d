"""Paged attention over the KV cache: the reference path (SDPA), on CPU and CUDA alike.

K/V of the new tokens are written at `slot_mapping`; each sequence reads its whole context back
through its block table. Decoding sequences (one query token each) run as one padded batch;
sequences with several query tokens (prefill chunks) run one by one with a bottom-right causal mask.

For fp32 on the CPU, every token (decodes, speculative verification, prefill chunks) goes to a
native kernel (layers/native/layer_ops.c) that reads the paged cache in place, without gathering
it, each query with the same code whatever its chunk or batch: a verified draft token gets the bits
plain decoding would have given it, and a prompt token the same bits however its prompt is chunked.
Prefill chunks went to SDPA until the kernel measured faster there too: SmolLM2-135M prefilling 64
short prompts (~118 tokens) 2,060 -> 2,322 tokens/s (attention 1.87 -> 0.82 ms a layer), and at
par on 1,500-token prompts (8.4 -> 8.0 ms a layer), both compute-bound.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenforge.model.layers.native import layer_ops
from tokenforge.model.layers.norm import runs_native

MAX_GROUP = 16  # query heads per KV head the native kernel takes (its head_dim: a multiple of 8)
NATIVE_KV_DTYPES = (torch.float32, torch.float16)  # the cache element types the native kernels read and write


def native_attention_fits(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the native attention takes a model of these shapes."""
    return head_dim % 8 == 0 and num_heads // num_kv_heads <= MAX_GROUP


def native_kv_cache(kv_cache: torch.Tensor) -> bool:
    """Whether the native kernels take this cache: fp32 or fp16, contiguous, head_dim a multiple of 8."""
    return kv_cache.dtype in NATIVE_KV_DTYPES and kv_cache.is_contiguous() and kv_cache.shape[-1] % 8 == 0


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: where each new token's K/V go
    # The first num_decodes sequences have one query token each, the rest several.
    num_decodes: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_num_blocks] int64 (padded with 0)
    decode_mask: torch.Tensor  # [num_decodes, 1, 1, max_num_blocks * block_size] bool
    # Prefill sequences: (first query token index, number of query tokens, context length).
    prefills: list[tuple[int, int, int]]
    prefill_block_ids: list[torch.Tensor]  # per prefill sequence: its block ids [num_blocks]
    # For the native kernel, every token [0, num_native_tokens) (decodes first), each with the row of
    # its sequence in native_block_tables and how many positions it sees.
    num_native_tokens: int = 0
    native_block_tables: torch.Tensor | None = None  # [num_native_sequences, max_num_blocks] int64
    native_token_seq: torch.Tensor | None = None  # [num_native_tokens] int64
    native_token_lens: torch.Tensor | None = None  # [num_native_tokens] int64
    max_native_len: int = 0


def kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """One layer's KV cache: [num_blocks, 2 (k, v), num_kv_heads, block_size, head_dim].

    Blocks come first so that reading a block table is one contiguous row gather (index_select); in
    a block, each head's keys (and values) lie together, so attention streams runs of block_size *
    head_dim elements (reading one head's row out of each token's K/V of all heads ran at a quarter
    of the memory's bandwidth here, measured).
    """
    return num_blocks, 2, num_kv_heads, block_size, head_dim


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache: kv_cache_shape(...); k, v: [num_tokens, num_kv_heads, head_dim]; slot_mapping:
    [num_tokens], slot = block id * block_size + offset in the block."""
    block_size = kv_cache.shape[3]
    blocks, offsets = slot_mapping // block_size, slot_mapping % block_size
    # Indices on dims 0 and 3 around two slices: the indexed view is [num_tokens, 2, num_kv_heads, head_dim].
    kv_cache[blocks, :, :, offsets] = torch.stack((k, v), dim=1).to(kv_cache.dtype)


def _gather(kv_cache: torch.Tensor, block_ids: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """The blocks of block_ids ([num_sequences * blocks each]) as [num_sequences, 2, num_kv_heads,
    blocks each * block_size, head_dim]: each sequence's keys and values per head in position order."""
    _, _, num_kv_heads, block_size, head_dim = kv_cache.shape
    kv = kv_cache.index_select(0, block_ids).view(num_sequences, -1, 2, num_kv_heads, block_size, head_dim)
    return kv.permute(0, 2, 3, 1, 4, 5).reshape(num_sequences, 2, num_kv_heads, -1, head_dim)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: this step's keys and values, already in kv_cache.

    Returns [num_tokens, num_heads, head_dim].
    """
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_kv_heads, head_dim = kv_cache.shape[2], kv_cache.shape[4]
    first_prefill = 0
    ops = layer_ops()
    if (ops is not None and meta.num_native_tokens and runs_native(q) and native_kv_cache(kv_cache)
            and native_attention_fits(q.shape[1], num_kv_heads, head_dim)):
        _native_attention(ops, q, kv_cache, meta, scale, out)
        first_prefill = meta.num_native_tokens
    d = 0 if first_prefill else meta.num_decodes
    if d:
        # One gather for K and V: [num_decodes, 2, num_kv_heads, max_num_blocks * block_size, head_dim]
        kv = _gather(kv_cache, meta.decode_block_tables.view(-1), d).to(q.dtype)  # fp16 cache: to the model's
        o = F.scaled_dot_product_attention(
            q[:d].unsqueeze(2), kv[:, 0], kv[:, 1], attn_mask=meta.decode_mask, scale=scale, enable_gqa=True,
        )  # [num_decodes, num_heads, 1, head_dim]
        out[:d] = o.squeeze(2)
    for (start, num_query, context_len), block_ids in zip(meta.prefills, meta.prefill_block_ids):
        if start < first_prefill:
            continue  # done natively
        # 4-D [1, heads, tokens, head_dim]: 3-D inputs fall back to SDPA's slow math path on CPU.
        qs = q[start : start + num_query].transpose(0, 1).unsqueeze(0)
        if num_query == context_len:
            # No earlier context: this step's K/V are the whole context, no need to read the cache.
            ks = k[start : start + num_query].transpose(0, 1).unsqueeze(0)
            vs = v[start : start + num_query].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kv = _gather(kv_cache, block_ids, 1)[0, :, :, :context_len].to(q.dtype)  # [2, kv heads, context, dim]
            # Query i sits at position context_len - num_query + i and sees keys up to there.
            offset = context_len - num_query
            rows = torch.arange(num_query, device=q.device).unsqueeze(1) + offset
            mask = torch.arange(context_len, device=q.device).unsqueeze(0) <= rows
            ks, vs = kv[0].unsqueeze(0), kv[1].unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + num_query] = o[0].transpose(0, 1)
    return out


def _native_attention(ops, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                      out: torch.Tensor) -> None:
    """The first meta.num_native_tokens queries, over the cache in place, into out."""
    num_heads, head_dim = q.shape[1:]
    num_kv_heads, block_size = kv_cache.shape[2], kv_cache.shape[3]
    if q.stride(2) != 1 or q.stride(1) != head_dim:
        q = q.contiguous()
    threads = torch.get_num_threads()
    tables = meta.native_block_tables
    scores = torch.empty(threads * num_heads * meta.max_native_len, dtype=torch.float32)
    ops.paged_attention(q.data_ptr(), q.stride(0), meta.num_native_tokens, num_heads, num_kv_heads, head_dim,
                        kv_cache.data_ptr(), kv_cache.dtype == torch.float16, block_size, tables.data_ptr(),
                        tables.shape[1], meta.native_token_seq.data_ptr(), meta.native_token_lens.data_ptr(), scale,
                        out.data_ptr(), scores.data_ptr(), meta.max_native_len, threads)
