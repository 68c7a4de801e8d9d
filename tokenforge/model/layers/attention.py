"""Paged attention over the KV cache: the reference path (SDPA), on CPU and CUDA alike.

K/V of the new tokens are written at `slot_mapping`; each sequence reads its whole context back
through its block table. Decoding sequences (one query token each) run as one padded batch;
sequences with several query tokens (prefill chunks) run one by one with a bottom-right causal mask.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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


def write_kv(kv_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv_cache: [num_blocks, block_size, 2, num_kv_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim].

    Blocks come first so that reading a block table is one contiguous row gather (index_select).
    """
    num_kv_heads, head_dim = k.shape[1:]
    slots = kv_cache.view(-1, 2, num_kv_heads, head_dim)
    slots.index_copy_(0, slot_mapping, torch.stack((k, v), dim=1))


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """q: [num_tokens, num_heads, head_dim]; k, v: this step's keys and values, already in kv_cache.

    Returns [num_tokens, num_heads, head_dim].
    """
    out = torch.empty_like(q)
    num_kv_heads, head_dim = kv_cache.shape[3:]
    d = meta.num_decodes
    if d:
        # One gather for K and V: [num_decodes, max_num_blocks * block_size, 2, num_kv_heads, head_dim]
        kv = kv_cache.index_select(0, meta.decode_block_tables.view(-1)).view(d, -1, 2, num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(
            q[:d].unsqueeze(2), kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2),
            attn_mask=meta.decode_mask, scale=scale, enable_gqa=True,
        )  # [num_decodes, num_heads, 1, head_dim]
        out[:d] = o.squeeze(2)
    for (start, num_query, context_len), block_ids in zip(meta.prefills, meta.prefill_block_ids):
        # 4-D [1, heads, tokens, head_dim]: 3-D inputs fall back to SDPA's slow math path on CPU.
        qs = q[start : start + num_query].transpose(0, 1).unsqueeze(0)
        if num_query == context_len:
            # No earlier context: this step's K/V are the whole context, no need to read the cache.
            ks = k[start : start + num_query].transpose(0, 1).unsqueeze(0)
            vs = v[start : start + num_query].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            kv = kv_cache.index_select(0, block_ids).view(-1, 2, num_kv_heads, head_dim)[:context_len]
            # Query i sits at position context_len - num_query + i and sees keys up to there.
            offset = context_len - num_query
            rows = torch.arange(num_query, device=q.device).unsqueeze(1) + offset
            mask = torch.arange(context_len, device=q.device).unsqueeze(0) <= rows
            ks = kv[:, 0].transpose(0, 1).unsqueeze(0)
            vs = kv[:, 1].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start : start + num_query] = o[0].transpose(0, 1)
    return out
