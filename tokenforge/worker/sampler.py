"""Sampler: turns one step's logits into one next token per request, plus logprobs when asked.

Per row: logprobs of the raw logits; logit bias, min_tokens, penalties; then greedy argmax, or
temperature, top-k, top-p, min-p and a draw. The caller's logits tensor is never written to.
"""

import itertools
from dataclasses import dataclass

import torch

from tokenforge.engine.request import Request


@dataclass
class SamplerOutput:
    # [num_requests]: the next token of each request, in the order of the logits rows.
    sampled_token_ids: list[int]
    # Per row: None when the request did not ask for logprobs, else (logprob of the sampled token,
    # the top `params.logprobs` [(token_id, logprob)], highest first), from the raw logits.
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def count_tokens(token_id_lists: list[list[int]], vocab_size: int, device=None) -> torch.Tensor:
    """How often each token occurs in each list: [len(token_id_lists), vocab_size] float32."""
    counts = torch.zeros(len(token_id_lists), vocab_size, dtype=torch.float32, device=device)
    flat = list(itertools.chain.from_iterable(token_id_lists))
    if not flat:
        return counts
    lengths = torch.tensor([len(ids) for ids in token_id_lists], device=device)
    rows = torch.repeat_interleave(torch.arange(len(token_id_lists), device=device), lengths)
    cols = torch.tensor(flat, dtype=torch.long, device=device)
    counts.index_put_((rows, cols), torch.ones(len(flat), device=device), accumulate=True)
    return counts


def apply_penalties(
    logits: torch.Tensor,  # [n, vocab_size]
    prompt_mask: torch.Tensor,  # [n, vocab_size] bool: the token is in the prompt
    output_counts: torch.Tensor,  # [n, vocab_size]: occurrences of the token in the output
    repetition_penalties: torch.Tensor,  # [n]
    frequency_penalties: torch.Tensor,  # [n]
    presence_penalties: torch.Tensor,  # [n]
) -> torch.Tensor:
    """Returns penalised logits (a new tensor).

    Repetition (CTRL/HF), over prompt and output tokens: logit / p if logit > 0 else logit * p.
    Frequency and presence (OpenAI), over output tokens: logit -= count * f + (count > 0) * pr.
    """
    seen = prompt_mask | (output_counts > 0)
    penalty = torch.where(seen, repetition_penalties.unsqueeze(1), 1.0)  # [n, vocab_size]
    logits = torch.where(logits > 0, logits / penalty, logits * penalty)
    logits = logits - output_counts * frequency_penalties.unsqueeze(1)
    return logits - (output_counts > 0) * presence_penalties.unsqueeze(1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keeps each row's top_k[i] largest logits (ties with the k-th are kept too)."""
    k = top_k.clamp(max=logits.shape[-1])  # [n]
    top_values = logits.topk(int(k.max()), dim=-1).values  # [n, max_k], descending
    kth = top_values.gather(1, (k - 1).unsqueeze(1))  # [n, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps each row's smallest set of most likely tokens whose probability sums to >= top_p."""
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # [n, vocab_size]
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens ranked above it already reach top_p; above the top token
    # there is 0 < top_p, so it always stays.
    mass_above = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_above >= top_p.unsqueeze(1)
    drop = torch.empty_like(drop_sorted).scatter_(1, sorted_ids, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens with prob < min_p * max prob, i.e. logit < max logit + log(min_p)."""
    threshold = logits.amax(dim=-1, keepdim=True) + torch.log(min_p).unsqueeze(1)  # [n, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample_from_logits(
    logits: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Draws one token per row from softmax(logits): [n] long.

    Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i, and needs
    no host sync. A row with a generator draws its E from it alone, so a seeded request gets the
    same tokens whatever else is in the batch.
    """
    probs = logits.softmax(dim=-1)  # [n, vocab_size]
    noise = torch.empty_like(probs)
    if any(g is None for g in generators):
        noise.exponential_()
    for row, generator in enumerate(generators):
        if generator is not None:
            row_noise = torch.empty(probs.shape[-1], device=generator.device)
            noise[row] = row_noise.exponential_(generator=generator).to(noise.device)
    # Exp(1) can round to 0; clamping keeps p / E finite and a zero p at zero.
    return probs.div_(noise.clamp_min_(torch.finfo(noise.dtype).tiny)).argmax(dim=-1)


def _needs_penalties(request: Request) -> bool:
    params = request.sampling_params
    return (
        params.repetition_penalty != 1.0
        or params.frequency_penalty != 0.0
        or params.presence_penalty != 0.0
    )


def _blocks_stop_tokens(request: Request) -> bool:
    return request.num_output_tokens < request.sampling_params.min_tokens


class Sampler:
    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape[0] == len(requests)
        num_rows = len(requests)
        params = [r.sampling_params for r in requests]
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        sampled_rows = [i for i, p in enumerate(params) if p.temperature != 0.0]
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
            self._apply_bias_and_min_tokens(logits, [requests[i] for i in adjust_rows], adjust_rows)
            penalty_rows = [i for i in adjust_rows if _needs_penalties(requests[i])]
            if penalty_rows:
                self._apply_penalties(logits, [requests[i] for i in penalty_rows], penalty_rows)

        if len(sampled_rows) < num_rows:
            token_ids = logits.argmax(dim=-1)  # [num_rows]; sampled rows are overwritten below
        else:
            token_ids = torch.empty(num_rows, dtype=torch.long, device=logits.device)
        if sampled_rows:
            sampled = self._sample([requests[i] for i in sampled_rows], logits[sampled_rows])
            token_ids[sampled_rows] = sampled

        output_logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * num_rows
        if raw_logprobs is not None:
            self._fill_logprobs(output_logprobs, raw_logprobs, token_ids, params, logprob_rows)
        return SamplerOutput(token_ids.tolist(), output_logprobs)

    @staticmethod
    def _apply_bias_and_min_tokens(
        logits: torch.Tensor, requests: list[Request], rows: list[int]
    ) -> None:
        """In place: adds logit_bias; bans EOS and stop ids while under min_tokens."""
        bias_rows, bias_ids, bias_values = [], [], []
        ban_rows, ban_ids = [], []
        for row, request in zip(rows, requests):
            params = request.sampling_params
            for token_id, value in params.logit_bias.items():
                bias_rows.append(row)
                bias_ids.append(token_id)
                bias_values.append(value)
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

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, requests: list[Request], rows: list[int]) -> None:
        """In place on the given rows of logits."""
        vocab_size, device = logits.shape[-1], logits.device
        output_counts = count_tokens([r.output_token_ids for r in requests], vocab_size, device)
        # Only repetition penalty looks at the prompt; skip building it for the other rows.
        prompts = [
            r.prompt_token_ids if r.sampling_params.repetition_penalty != 1.0 else []
            for r in requests
        ]
        prompt_mask = count_tokens(prompts, vocab_size, device) > 0

        def per_row(name: str) -> torch.Tensor:
            values = [getattr(r.sampling_params, name) for r in requests]
            return torch.tensor(values, dtype=torch.float32, device=device)

        logits[rows] = apply_penalties(
            logits[rows],
            prompt_mask,
            output_counts,
            per_row("repetition_penalty"),
            per_row("frequency_penalty"),
            per_row("presence_penalty"),
        )

    @staticmethod
    def _sample(requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """Temperature, top-k, top-p, min-p and a draw for rows with temperature > 0: [n] long."""
        params = [r.sampling_params for r in requests]
        device = logits.device
        temperatures = torch.tensor([p.temperature for p in params], device=device)
        logits = logits.float() / temperatures.unsqueeze(1)  # [n, vocab_size]

        def filter_rows(rows: list[int], fn, values: list) -> None:
            if rows:
                logits[rows] = fn(logits[rows], torch.tensor(values, device=device))

        top_k_rows = [i for i, p in enumerate(params) if p.top_k is not None]
        filter_rows(top_k_rows, apply_top_k, [params[i].top_k for i in top_k_rows])
        top_p_rows = [i for i, p in enumerate(params) if p.top_p < 1.0]
        filter_rows(top_p_rows, apply_top_p, [params[i].top_p for i in top_p_rows])
        min_p_rows = [i for i, p in enumerate(params) if p.min_p > 0.0]
        filter_rows(min_p_rows, apply_min_p, [params[i].min_p for i in min_p_rows])
        return sample_from_logits(logits, [r.generator for r in requests])

    @staticmethod
    def _fill_logprobs(
        output_logprobs: list,
        raw_logprobs: torch.Tensor,  # [len(rows), vocab_size]
        token_ids: torch.Tensor,  # [num_rows]
        params: list,
        rows: list[int],
    ) -> None:
        chosen = raw_logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1).tolist()
        max_k = min(max(params[i].logprobs for i in rows), raw_logprobs.shape[-1])
        top_ids: list[list[int]] = [[] for _ in rows]
        top_values: list[list[float]] = [[] for _ in rows]
        if max_k > 0:
            top = raw_logprobs.topk(max_k, dim=-1)  # sorted, highest first
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
        for j, row in enumerate(rows):
            k = params[row].logprobs
            output_logprobs[row] = (chosen[j], list(zip(top_ids[j][:k], top_values[j][:k])))
