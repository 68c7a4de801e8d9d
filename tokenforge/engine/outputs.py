"""RequestOutput: what one engine step reports for one request (a delta, not the whole text)."""

from dataclasses import dataclass, field

from tokenforge.engine.request import FinishReason


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_output_tokens: int = 0  # all output tokens so far
    # (token_id, logprob, top [(token_id, logprob)]) for each new token, when asked for.
    new_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    error: str | None = None  # set with finish_reason ERROR
