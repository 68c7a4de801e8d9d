"""ForwardBatch: every tensor of one forward pass over a flat batch of sequence chunks.

Used by the model runner (the target model) and the draft-model proposer alike. Chunks of one
token (decodes) go first: the SDPA path runs them as one padded batch, the others one by one;
the native attention kernel takes every token.
"""

from dataclasses import dataclass

import torch

from tokenforge.engine.kv_cache_manager import cdiv
from tokenforge.model.layers.attention import AttentionMetadata


@dataclass
class SequenceChunk:
    token_ids: list[int]  # the tokens computed this pass
    start: int  # position of the first of them (the tokens before are in the KV cache)
    block_ids: list[int]  # the sequence's block table, covering start + len(token_ids) slots
    num_logits: int = 0  # logits wanted for the last this-many tokens


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_logits] int64: the hidden rows whose logits are computed
    # Per chunk, in the order given: its rows of the logits (range(0) when it asked for none).
    logits_rows: list[range]


def build_batch(chunks: list[SequenceChunk], block_size: int, device: torch.device) -> ForwardBatch:
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].token_ids) > 1)  # decodes first
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    logits_indices: list[int] = []
    logits_rows: list[range] = [range(0)] * len(chunks)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.int64, device=device)  # noqa: E731
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[tuple[int, int, int]] = []
    prefill_block_ids: list[torch.Tensor] = []
    native_tables: list[list[int]] = []
    native_seq: list[int] = []
    native_lens: list[int] = []
    for i in order:
        chunk = chunks[i]
        n, start, block_ids = len(chunk.token_ids), chunk.start, chunk.block_ids
        end = start + n
        first = len(input_ids)
        input_ids.extend(chunk.token_ids)
        positions.extend(range(start, end))
        slots.extend(block_ids[p // block_size] * block_size + p % block_size for p in range(start, end))
        native_seq.extend([len(native_tables)] * n)
        native_lens.extend(range(start + 1, end + 1))
        native_tables.append(block_ids[: cdiv(end, block_size)])
        if n == 1:
            decode_tables.append(block_ids[: cdiv(end, block_size)])
            decode_lens.append(end)
        else:
            prefills.append((first, n, end))
            prefill_block_ids.append(torch.tensor(block_ids[: cdiv(end, block_size)], device=device))
        if chunk.num_logits:
            logits_rows[i] = range(len(logits_indices), len(logits_indices) + chunk.num_logits)
            logits_indices.extend(range(first + n - chunk.num_logits, first + n))
    meta = AttentionMetadata(
        slot_mapping=as_tensor(slots),
        num_decodes=len(decode_lens),
        decode_block_tables=_pad_tables(decode_tables, device),
        decode_mask=_decode_mask(decode_lens, block_size, device),
        prefills=prefills,
        prefill_block_ids=prefill_block_ids,
        num_native_tokens=len(native_seq),
        native_block_tables=_pad_tables(native_tables, device),
        native_token_seq=as_tensor(native_seq),
        native_token_lens=as_tensor(native_lens),
        max_native_len=max(native_lens, default=0),
    )
    return ForwardBatch(as_tensor(input_ids), as_tensor(positions), meta, as_tensor(logits_indices), logits_rows)


def _pad_tables(tables: list[list[int]], device: torch.device) -> torch.Tensor:
    width = max((len(t) for t in tables), default=0)
    padded = [t + [0] * (width - len(t)) for t in tables]
    return torch.tensor(padded, dtype=torch.int64, device=device).view(len(tables), width)


def _decode_mask(context_lens: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    width = cdiv(max(context_lens, default=0), block_size) * block_size
    lens = torch.tensor(context_lens, dtype=torch.int64, device=device)
    mask = torch.arange(width, device=device).unsqueeze(0) < lens.unsqueeze(1)
    return mask.view(len(context_lens), 1, 1, width)
