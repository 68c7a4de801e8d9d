"""LLM: the offline API. `LLM(model).generate(prompts, params)` and `.chat(messages, params)`."""

import dataclasses
import itertools
from dataclasses import dataclass

from tokenforge.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, SpeculativeConfig
from tokenforge.engine.engine_core import EngineCore
from tokenforge.engine.factory import build_engine_core
from tokenforge.engine.request import FinishReason
from tokenforge.errors import InvalidRequestError
from tokenforge.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    stop_reason: int | str | None = None
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = dataclasses.field(default_factory=list)


@dataclass
class GenerationOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0


def split_config_kwargs(speculative: SpeculativeConfig | None = None, **kwargs) -> EngineConfig:
    """Keyword arguments (model=, dtype=, block_size=, max_num_seqs=, ...) -> EngineConfig;
    speculative decoding as one SpeculativeConfig (its max_num_seqs is not the scheduler's)."""
    parts = {}
    for cls in (ModelConfig, CacheConfig, SchedulerConfig):
        names = {f.name for f in dataclasses.fields(cls)}
        parts[cls] = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
    if kwargs:
        raise TypeError(f"unknown engine options: {', '.join(kwargs)}")
    return EngineConfig(parts[ModelConfig], parts[CacheConfig], parts[SchedulerConfig],
                        speculative or SpeculativeConfig())


def child_params(params: SamplingParams, index: int) -> SamplingParams:
    """The i-th of n samples: its own seed (seed + i), so the samples differ but reproduce."""
    seed = None if params.seed is None else params.seed + index
    return dataclasses.replace(params, n=1, seed=seed)


class LLM:
    def __init__(self, model: str = ModelConfig.model, *, engine: EngineCore | None = None, **kwargs):
        """Loads `model` with engine options as keywords, or wraps an EngineCore built already."""
        self.engine = engine or build_engine_core(split_config_kwargs(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[GenerationOutput]:
        """prompts: a string, a list of strings, or a list of token-id lists."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        token_lists = [self._encode(p) for p in prompts]
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise InvalidRequestError("give one SamplingParams, or one per prompt")
        return self._run(token_lists, params_list)

    def chat(self, conversations, params: SamplingParams | None = None) -> list[GenerationOutput]:
        """conversations: one list of {"role", "content"} messages, or a list of them."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        token_lists = [self.apply_chat_template(c) for c in conversations]
        return self._run(token_lists, [params or SamplingParams()] * len(token_lists))

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not self.tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: give token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def _run(self, token_lists: list[list[int]], params_list: list[SamplingParams]) -> list[GenerationOutput]:
        engine = self.engine
        groups: list[tuple[str, list[int], list[str]]] = []
        requests = []
        for token_ids, params in zip(token_lists, params_list):
            group_id = f"gen-{next(self._ids)}"
            child_ids = [f"{group_id}-{i}" for i in range(params.n)]
            # Validate every child before queueing any, so bad input leaves the engine untouched.
            requests.extend(engine.make_request(cid, token_ids, child_params(params, i)) for i, cid in enumerate(child_ids))
            groups.append((group_id, token_ids, child_ids))
        for request in requests:
            engine.add_request(request)
        texts: dict[str, list[str]] = {r.request_id: [] for r in requests}
        by_id = {r.request_id: r for r in requests}
        while engine.has_unfinished_requests():
            for out in engine.step():
                texts[out.request_id].append(out.new_text)
        results = []
        for group_id, token_ids, child_ids in groups:
            outputs = [
                CompletionOutput(i, "".join(texts[cid]), list(by_id[cid].output_token_ids), by_id[cid].finish_reason,
                                 by_id[cid].stop_reason, list(by_id[cid].output_logprobs))
                for i, cid in enumerate(child_ids)
            ]
            results.append(GenerationOutput(group_id, token_ids, outputs, by_id[child_ids[0]].num_cached_tokens or 0))
        return results
