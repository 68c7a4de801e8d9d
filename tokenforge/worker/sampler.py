"""Sampler: turns one step's logits into one next token per request, plus logprobs when asked.

Per row: logprobs of the raw logits; logit bias, min_tokens, penalties; then greedy argmax, or
temperature, top-k, top-p, min-p and a draw. The caller's logits tensor is never written to.
"""

import itertools
from dataclasses import dataclass

import torch

from tokenforge.engine.request import Request
from tokenforge.spec.rejection import rejection_sample, verify_greedy

# Rows with top-p or min-p but no top-k are first filtered within their this-many likeliest
# tokens; only a row whose kept set may reach past them pays for a full-vocabulary sort.
NUM_CANDIDATES = 256


@dataclass
class SamplerOutput:
    # [num_requests]: the next token of each request, in the order of the logits rows.
    sampled_token_ids: list[int]
    # Per row: None when the request did not ask for logprobs, else (logprob of the sampled token,
    # the top `params.logprobs` [(token_id, logprob)], highest first), from the raw logits.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def _flat_ids(token_id_lists: list[list[int]], vocab_size: int, device) -> tuple[torch.Tensor, ...]:
    """Each listed token's row, and its row-major position row * vocab_size + token_id."""
    lengths = torch.tensor([len(ids) for ids in token_id_lists], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_id_lists), device=device), lengths)
    token_ids = torch.tensor(list(itertools.chain.from_iterable(token_id_lists)), device=device)
    return rows, rows * vocab_size + token_ids.long()  # [total], [total]


def apply_penalties(
    logits: torch.Tensor,  # [n, vocab_size], contiguous; changed in place
    prompt_token_ids: list[list[int]],
    output_token_ids: list[list[int]],
    repetition_penalties: torch.Tensor,  # [n]
    frequency_penalties: torch.Tensor,  # [n]
    presence_penalties: torch.Tensor,  # [n]
) -> None:
    """Repetition (CTRL/HF), over prompt and output tokens: logit / p if logit > 0 else logit * p.
    Then frequency and presence (OpenAI), over output tokens: logit -= count * f + (count > 0) * pr.

    Touches only the (row, token) pairs that occur. A repeated pair is written several times with
    the same value (all reads come before the write), so the once-per-token terms need no dedup;
    the per-occurrence frequency term accumulates.
    """
    vocab_size, device = logits.shape[-1], logits.device
    flat_logits = logits.view(-1)
    prompt_rows, prompt_ids = _flat_ids(prompt_token_ids, vocab_size, device)
    output_rows, output_ids = _flat_ids(output_token_ids, vocab_size, device)
    seen_ids = torch.cat([prompt_ids, output_ids])
    values = flat_logits.index_select(0, seen_ids)
    penalty = repetition_penalties.index_select(0, torch.cat([prompt_rows, output_rows]))
    penalised = torch.where(values > 0, values / penalty, values * penalty)
    flat_logits.index_copy_(0, seen_ids, penalised)
    values = flat_logits.index_select(0, output_ids)
    presence = presence_penalties.index_select(0, output_rows)
    flat_logits.index_copy_(0, output_ids, values - presence)
    flat_logits.index_add_(0, output_ids, -frequency_penalties.index_select(0, output_rows))


def filter_top_candidates(
    logits: torch.Tensor,  # [n, vocab_size], temperature already applied
    top_k: torch.Tensor,  # [n] long; vocab_size means no limit
    top_p: torch.Tensor,  # [n]
    min_p: torch.Tensor,  # [n]
    num_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Applies top-k, then top-p, then min-p within each row's num_candidates likeliest tokens.

    Returns probs [n, C] (of the kept tokens, sorted descending; 0 once dropped), their token ids
    [n, C], and covered [n]: True where no token outside the candidates survives the filters.
    """
    vocab_size = logits.shape[-1]
    has_top_k = top_k < vocab_size
    max_top_k = int(torch.where(has_top_k, top_k, 0).max())
    num_candidates = min(max(num_candidates, max_top_k), vocab_size)
    values, token_ids = logits.topk(num_candidates, dim=-1)  # [n, C], sorted descending
    positions = torch.arange(num_candidates, device=logits.device)
    values = values.masked_fill(positions >= top_k.unsqueeze(1), float("-inf"))
    # Normaliser: the top-k set lies among the candidates; without top-k it is the whole row.
    unnormalised = (values - values[:, :1]).exp()  # [n, C]
    mass = unnormalised.sum(dim=-1)  # [n]
    if not has_top_k.all():
        mass = torch.where(has_top_k, mass, (logits - values[:, :1]).exp().sum(dim=-1))
    probs = unnormalised / mass.unsqueeze(1)
    # top-p: drop a token once the likelier tokens reach top_p (the top one always stays).
    cumulative = probs.cumsum(dim=-1)
    drop = (cumulative - probs) >= top_p.unsqueeze(1)
    # min-p: prob < min_p * max prob, i.e. logit < max logit + log(min_p).
    min_logit = values[:, :1] + torch.log(min_p).unsqueeze(1)  # [n, 1]
    drop |= values < min_logit
    covered = (
        has_top_k
        | ((top_p < 1.0) & (cumulative[:, -1] >= top_p))
        | (values[:, -1] < min_logit[:, 0])
        | (num_candidates == vocab_size)
    )
    return probs.masked_fill(drop, 0.0), token_ids, covered


def sample_from_probs(
    probs: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Draws one position per row, in proportion to probs [n, W] (need not sum to 1): [n] long.

    Inverse CDF with one uniform number per row, so a row with a generator draws from it alone and
    a seeded request gets the same tokens whatever else is in the batch. The first cdf >= x, for x
    in (0, total], is never a zero-probability position.
    """
    cdf = probs.cumsum(dim=-1)  # [n, W], non-decreasing
    uniform = torch.rand(probs.shape[0], device=probs.device)  # [n] in [0, 1)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(1, generator=generator, device=generator.device).item()
    targets = (1.0 - uniform) * cdf[:, -1]  # [n] in (0, total]
    # A NaN row (non-finite logits) would search past the end: keep every id inside the row.
    return torch.searchsorted(cdf, targets.unsqueeze(1)).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def _needs_penalties(request: Request) -> bool:
    p = request.sampling_params
    return (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) != (1.0, 0.0, 0.0)


def _blocks_stop_tokens(request: Request) -> bool:
    return request.num_output_tokens < request.sampling_params.min_tokens


class Sampler:
    """Stateless; seeded requests carry their own torch.Generator."""

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(requests)
        num_rows = len(requests)
        params = [r.sampling_params for r in requests]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
        adjust_rows = [
            i
            for i, r in enumerate(requests)
            if r.sampling_params.logit_bias or _blocks_stop_tokens(r) or _needs_penalties(r)
        ]
        if not (logprob_rows or sampled_rows or adjust_rows):
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * num_rows)

        raw_logprobs = None
        if logprob_rows:
            # [num_logprob_rows, vocab_size]; indexing copies, so later edits do not reach it.
            raw_logprobs = torch.log_softmax(logits[logprob_rows].float(), dim=-1)
        if adjust_rows:
            logits = logits.float().clone()
            self._adjust_logits(logits, requests, adjust_rows)
        if len(sampled_rows) < num_rows:
            token_ids = logits.argmax(dim=-1)  # [num_rows]; sampled rows are overwritten below
        else:
            token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        if sampled_rows:
            # _sample changes its logits: hand it our own clone, or a copy of the sampled rows.
            owned = adjust_rows and len(sampled_rows) == num_rows
            sampled_logits = logits if owned else logits[sampled_rows].float()
            sampled_requests = [requests[i] for i in sampled_rows]
            token_ids[sampled_rows] = self._sample(sampled_logits, sampled_requests)

        output_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * num_rows
        if raw_logprobs is not None:
            chosen = raw_logprobs.gather(1, token_ids[logprob_rows].unsqueeze(1)).squeeze(1)
            max_k = min(max(params[i].logprobs for i in logprob_rows), logits.shape[-1])
            top = raw_logprobs.topk(max_k, dim=-1)  # sorted, highest first
            rows = zip(logprob_rows, chosen.tolist(), top.indices.tolist(), top.values.tolist())
            for row, logprob, top_ids, top_logprobs in rows:
                k = params[row].logprobs
                output_logprobs[row] = (logprob, list(zip(top_ids[:k], top_logprobs[:k])))
        return SamplerOutput(token_ids.tolist(), output_logprobs)

    def verify(self, logits: torch.Tensor, requests: list[Request], drafts: list[list[int]],
               draft_probs: list[torch.Tensor | None]) -> list[list[int]]:
        """Speculative verification. logits [sum(k_i + 1), vocab_size]: request i's k_i + 1 rows
        follow its last token and each of its drafts. Returns per request the accepted drafts
        and one more token (see spec.rejection). Position-dependent processing (penalties, the
        min_tokens ban, logprobs) is never speculated (spec.controller), so every row of a
        request is processed alike."""
        row_requests = [r for r, d in zip(requests, drafts) for _ in range(len(d) + 1)]
        starts = list(itertools.accumulate((len(d) + 1 for d in drafts), initial=0))
        greedy = [i for i, r in enumerate(requests) if r.sampling_params.greedy]
        sampled = [i for i, r in enumerate(requests) if not r.sampling_params.greedy]
        out: list[list[int]] = [[] for _ in requests]
        if greedy:
            logits = self._with_bias(logits, row_requests)
            token_ids = logits.argmax(dim=-1).tolist()
            for i in greedy:
                out[i] = verify_greedy(drafts[i], token_ids[starts[i] : starts[i + 1]])
        if sampled:
            probs = sampling_probs(logits, row_requests)  # [num_rows, vocab_size]
            for i in sampled:
                out[i] = rejection_sample(drafts[i], probs[starts[i] : starts[i + 1]], draft_probs[i],
                                          requests[i].generator)
        return out

    @classmethod
    def _with_bias(cls, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """logits with each row's logit_bias added (a copy when any; the same tensor otherwise)."""
        rows = [i for i, r in enumerate(requests) if r.sampling_params.logit_bias]
        if not rows:
            return logits
        logits = logits.float().clone()
        cls._adjust_logits(logits, requests, rows)
        return logits

    @staticmethod
    def _adjust_logits(logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        """In place: logit_bias, the min_tokens ban on EOS and stop ids, then penalties."""
        bias_rows, bias_ids, bias_values, ban_rows, ban_ids = [], [], [], [], []
        for row in rows:
            request, params = requests[row], requests[row].sampling_params
            bias_rows.extend([row] * len(params.logit_bias))
            bias_ids.extend(params.logit_bias.keys())
            bias_values.extend(params.logit_bias.values())
            if _blocks_stop_tokens(request):
                stop_ids = list(params.stop_token_ids)
                if request.eos_token_id is not None:
                    stop_ids.append(request.eos_token_id)
                ban_rows.extend([row] * len(stop_ids))
                ban_ids.extend(stop_ids)
        device = logits.device
        if bias_rows:
            index = (torch.tensor(bias_rows, device=device), torch.tensor(bias_ids, device=device))
            values = torch.tensor(bias_values, dtype=logits.dtype, device=device)
            logits.index_put_(index, values, accumulate=True)
        if ban_rows:
            index = (torch.tensor(ban_rows, device=device), torch.tensor(ban_ids, device=device))
            logits.index_put_(index, torch.tensor(float("-inf"), device=device))
        if not any(_needs_penalties(requests[row]) for row in rows):
            return

        def per_row(name: str) -> torch.Tensor:
            values = [getattr(r.sampling_params, name) for r in requests]
            return torch.tensor(values, dtype=logits.dtype, device=device)

        # Rows without penalties get neutral ones; leaving out their tokens saves the work.
        repeats = [r.sampling_params.repetition_penalty != 1.0 for r in requests]
        apply_penalties(
            logits,
            [r.prompt_token_ids if repeat else [] for r, repeat in zip(requests, repeats)],
            [r.output_token_ids if _needs_penalties(r) else [] for r in requests],
            per_row("repetition_penalty"),
            per_row("frequency_penalty"),
            per_row("presence_penalty"),
        )

    @staticmethod
    def _sample(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Draws for rows with temperature > 0 (logits [n, vocab_size] is ours to change): [n]."""
        params = [r.sampling_params for r in requests]
        vocab_size, device = logits.shape[-1], logits.device
        logits.div_(torch.tensor([p.temperature for p in params], device=device).unsqueeze(1))
        token_ids = torch.empty(len(requests), dtype=torch.long, device=device)
        filtered = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1.0 or p.min_p > 0.0]
        plain = sorted(set(range(len(requests))) - set(filtered))
        if plain:
            plain_logits = logits if len(plain) == len(requests) else logits[plain]
            probs = plain_logits.softmax(dim=-1)  # [num_plain, vocab_size]
            token_ids[plain] = sample_from_probs(probs, [requests[i].generator for i in plain])
        # A row whose kept set may reach past the candidates draws nothing in the first pass and
        # retries on the whole vocabulary, so each row takes one number from its generator.
        for num_candidates in (NUM_CANDIDATES, vocab_size):
            if not filtered:
                break
            rows_params = [params[i] for i in filtered]
            probs, candidate_ids, covered = filter_top_candidates(
                logits[filtered],
                torch.tensor([p.top_k or vocab_size for p in rows_params], device=device),
                torch.tensor([p.top_p for p in rows_params], device=device),
                torch.tensor([p.min_p for p in rows_params], device=device),
                num_candidates,
            )
            covered_list = covered.tolist()
            done = [j for j, ok in enumerate(covered_list) if ok]
            if done:
                generators = [requests[filtered[j]].generator for j in done]
                positions = sample_from_probs(probs[done], generators)  # [len(done)]
                chosen = candidate_ids[done].gather(1, positions.unsqueeze(1)).squeeze(1)
                token_ids[[filtered[j] for j in done]] = chosen
            filtered = [row for row, ok in zip(filtered, covered_list) if not ok]
        return token_ids


def sampling_probs(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """[n, vocab_size]: the distribution each row's token is drawn from (temperature > 0 rows):
    logit_bias, temperature, then top-k, top-p and min-p, renormalised. Penalties and the
    min_tokens ban are left out: speculation, the only caller, is off while they apply."""
    logits = Sampler._with_bias(logits, requests).float().clone()  # ours to change
    params = [r.sampling_params for r in requests]
    vocab_size, device = logits.shape[-1], logits.device
    logits.div_(torch.tensor([p.temperature for p in params], device=device).unsqueeze(1))
    probs = logits.softmax(dim=-1)
    filtered = [i for i, p in enumerate(params) if p.top_k or p.top_p < 1.0 or p.min_p > 0.0]
    if filtered:
        rows_params = [params[i] for i in filtered]
        kept, token_ids, _ = filter_top_candidates(
            logits[filtered],
            torch.tensor([p.top_k or vocab_size for p in rows_params], device=device),
            torch.tensor([p.top_p for p in rows_params], device=device),
            torch.tensor([p.min_p for p in rows_params], device=device),
            vocab_size,  # every token is a candidate: the kept set is always covered
        )
        kept = kept / kept.sum(dim=-1, keepdim=True)
        probs[filtered] = torch.zeros_like(kept).scatter_(1, token_ids, kept)
    return probs
