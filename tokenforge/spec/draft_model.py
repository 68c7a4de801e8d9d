"""Draft-model proposer: a smaller model with the same vocabulary drafts k tokens per request.

The draft keeps its own paged KV cache. It runs over a request's prompt at the step that prefilled
it (prepare). Each drafting step it first catches up on the tokens it has not seen (the tokens
accepted last step, the target's own token, any decoded while drafting was off) in one batched
pass, then drafts one token per pass. Its K/V of rejected drafts are overwritten next time: the
longest prefix of what it computed that matches the request's real tokens stays valid.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from tokenforge.engine.block_pool import Block, BlockPool
from tokenforge.engine.kv_cache_manager import cdiv
from tokenforge.errors import ConfigError
from tokenforge.model.layers.quant_linear import Int8Linear
from tokenforge.model.loader import LoadedModel
from tokenforge.spec.proposer import Proposal
from tokenforge.spec.rejection import draw
from tokenforge.spec.timing import time_forward_pass
from tokenforge.worker.batch import SequenceChunk, build_batch
from tokenforge.worker.model_runner import allocate_kv_caches
from tokenforge.worker.sampler import sampling_probs

if TYPE_CHECKING:
    from tokenforge.engine.request import Request

# Tokens a drafting round after a drafting round catches up on: its last draft, never fed to the
# draft, and the target's own token (fewer after a rejection).
ROUND_CATCH_UP = 2


def check_vocab_match(target: LoadedModel, draft: LoadedModel) -> None:
    """Refuses a draft whose token ids mean something else than the target's (ConfigError)."""
    target_size, draft_size = target.arch_config.vocab_size, draft.arch_config.vocab_size
    if target_size != draft_size:
        raise ConfigError(f"the draft model's vocabulary has {draft_size} ids, the target's {target_size}: "
                          "speculative decoding needs the same tokenizer")
    if target.tokenizer is None or draft.tokenizer is None:
        return  # shape-only models: ids are all there is
    target_vocab, draft_vocab = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if target_vocab != draft_vocab:
        differing = sorted(set(target_vocab.items()) ^ set(draft_vocab.items()))[:3]
        raise ConfigError("the draft model's tokenizer differs from the target's (for example "
                          f"{differing}): speculative decoding needs the same tokenizer")


@dataclass
class _DraftSequence:
    blocks: list[Block] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # tokens whose K/V the draft cache holds
    num_verified: int = 0  # the first this-many of token_ids were the request's real tokens


def limited_head(model: torch.nn.Module, num_ids: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """hidden -> the logits of the first num_ids token ids, from the model's head (its int8 codes or
    weights shared, nothing copied); None for a head of another kind."""
    head = model.lm_head
    if type(head) is Int8Linear:
        return head.first_outputs(num_ids)
    if head is not None and not isinstance(head, nn.Linear):
        return None
    weight = model.embed_tokens.weight if head is None else head.weight
    bias = None if head is None or head.bias is None else head.bias[:num_ids]
    return lambda hidden: F.linear(hidden, weight[:num_ids], bias)


class DraftModelProposer:
    def __init__(self, draft: LoadedModel, target: LoadedModel, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, head_ids: int = 0):
        """head_ids: compute the draft's logits over the first head_ids ids only (0: all); the other
        ids get probability 0 in q, which rejection sampling allows (the target verifies every token)."""
        check_vocab_match(target, draft)
        self.model = draft.model
        self.vocab_size = draft.arch_config.vocab_size
        self.head = limited_head(draft.model, head_ids) if 0 < head_ids < self.vocab_size else None
        self.device = device
        self.block_size = block_size
        arch = draft.arch_config
        self.kv_caches = allocate_kv_caches(arch, num_blocks, block_size, dtype, device)  # as the target's
        self.block_pool = BlockPool(num_blocks, enable_caching=False)
        self.sequences: dict[str, _DraftSequence] = {}
        # A decode step reads every weight once: its cost scales with the parameter count, until
        # measure_cost replaces this estimate with timings (quantization and overheads differ).
        self.draft_cost = arch.num_params / target.arch_config.num_params

    def measure_cost(self, target_one_token_s: float) -> float:
        """Sets draft_cost to the time of a one-token draft pass (the fastest of a few, after a
        warm-up) over target_one_token_s, the same timing of the target. Run before any request:
        it writes slot 0 of block 0 of the draft's cache."""
        draft_s = time_forward_pass(self.model, self.kv_caches, self.block_size, self.device, logits=self._logits)
        self.draft_cost = draft_s / target_one_token_s
        return self.draft_cost

    def release(self, live_request_ids: set[str]) -> None:
        for request_id in [i for i in self.sequences if i not in live_request_ids]:
            self.block_pool.free_blocks(self.sequences.pop(request_id).blocks)

    @torch.inference_mode()
    def propose(self, requests: list["Request"], num_tokens: dict[str, int]) -> dict[str, Proposal]:
        chunks, drafting, num_caught_up = [], [], {}
        for request in requests:
            chunk = self._catch_up(request, num_tokens[request.request_id])
            if chunk is not None:
                chunks.append(chunk)
                drafting.append(request)
                num_caught_up[request.request_id] = len(chunk.token_ids)
        drafts: list[list[int]] = [[] for _ in drafting]
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]
        for step in range(max((num_tokens[r.request_id] for r in drafting), default=0)):
            if step:  # feed each request's last draft; those that have all theirs drop out
                active = [i for i, r in enumerate(drafting) if len(drafts[i]) < num_tokens[r.request_id]]
                chunks = [self._next_chunk(drafting[i], drafts[i]) for i in active]
            else:
                active = list(range(len(drafting)))
            batch = build_batch(chunks, self.block_size, self.device)
            hidden = self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)
            logits = self._logits(hidden[batch.logits_indices]).float()  # [len(active), V]
            self._draw(logits, [drafting[i] for i in active], [drafts[i] for i in active], [probs[i] for i in active])
        proposals = {}
        for request, token_ids, q in zip(drafting, drafts, probs):
            sequence = self.sequences[request.request_id]
            sequence.token_ids = request.all_token_ids + token_ids[:-1]  # the last draft was never fed
            sequence.num_verified = request.num_tokens
            proposals[request.request_id] = Proposal(token_ids, torch.stack(q) if q else None,
                                                     max(0, num_caught_up[request.request_id] - ROUND_CATCH_UP))
        return proposals

    @torch.inference_mode()
    def prepare(self, requests: list["Request"]) -> None:
        """Runs the draft over each request's prompt in one batched pass (all its tokens but the last,
        whose logits the first drafting round needs), at the step that prefilled it: the draft's
        prompt pass joins the target's in the time to the first token, as in vLLM and llama.cpp,
        instead of stalling the stream at its first drafting round."""
        chunks = []
        for request in requests:
            chunk = self._catch_up(request, 1)
            if chunk is None or len(chunk.token_ids) < 2:
                continue
            chunks.append(SequenceChunk(chunk.token_ids[:-1], chunk.start, chunk.block_ids, 0))
            sequence = self.sequences[request.request_id]
            sequence.token_ids = request.all_token_ids[:-1]
            sequence.num_verified = len(sequence.token_ids)
        if chunks:
            batch = build_batch(chunks, self.block_size, self.device)
            self.model(batch.input_ids, batch.positions, self.kv_caches, batch.meta)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The draft's logits [rows, V]; with a limited head, -inf past its ids (q = 0 there)."""
        if self.head is None:
            return self.model.compute_logits(hidden)
        logits = self.head(hidden)
        return F.pad(logits, (0, self.vocab_size - logits.shape[-1]), value=float("-inf"))

    def _catch_up(self, request: "Request", num_drafts: int) -> SequenceChunk | None:
        """The chunk of tokens the draft has not computed yet; None if its cache is full."""
        sequence = self.sequences.setdefault(request.request_id, _DraftSequence())
        token_ids = request.all_token_ids
        num_valid = sequence.num_verified
        for old, new in zip(sequence.token_ids[num_valid:], token_ids[num_valid:]):
            if old != new:
                break
            num_valid += 1
        num_valid = min(num_valid, len(token_ids) - 1)  # the last token's logits are needed
        # Slots for the real tokens and all drafts but the last (never fed to the draft).
        num_blocks = cdiv(len(token_ids) + num_drafts - 1, self.block_size) - len(sequence.blocks)
        if num_blocks > self.block_pool.num_free_blocks:
            return None
        if num_blocks > 0:
            sequence.blocks.extend(self.block_pool.get_new_blocks(num_blocks))
        sequence.token_ids = token_ids[:num_valid]
        return SequenceChunk(token_ids[num_valid:], num_valid, [b.block_id for b in sequence.blocks], 1)

    def _next_chunk(self, request: "Request", drafts: list[int]) -> SequenceChunk:
        sequence = self.sequences[request.request_id]
        position = request.num_tokens + len(drafts) - 1
        return SequenceChunk([drafts[-1]], position, [b.block_id for b in sequence.blocks], 1)

    @staticmethod
    def _draw(logits: torch.Tensor, requests: list["Request"], drafts: list[list[int]],
              probs: list[list[torch.Tensor]]) -> None:
        """Appends one draft per request: argmax for greedy requests, else a draw from q (kept
        for the rejection test), with the request's own generator."""
        greedy = [r.sampling_params.greedy for r in requests]
        argmax = logits.argmax(dim=-1).tolist()
        sampled = [i for i, g in enumerate(greedy) if not g]
        q = sampling_probs(logits[sampled], [requests[i] for i in sampled]) if sampled else None
        for row, request in enumerate(requests):
            if greedy[row]:
                drafts[row].append(argmax[row])
                continue
            q_row = q[sampled.index(row)]
            uniform = torch.rand(1, generator=request.generator).item()
            drafts[row].append(draw(q_row, uniform))
            probs[row].append(q_row)
