"""Request: one sequence's tokens, progress and status as the engine sees it."""

import enum
import time
from dataclasses import dataclass, field

import torch

from tokenforge.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    # Ordered: everything after RUNNING is finished.
    WAITING = 0
    PREEMPTED = 1
    RUNNING = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5
    FINISHED_ERROR = 6

    @property
    def finished(self) -> bool:
        return self > RequestStatus.RUNNING


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"
    ERROR = "error"


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: FinishReason.STOP,
    RequestStatus.FINISHED_LENGTH: FinishReason.LENGTH,
    RequestStatus.FINISHED_ABORTED: FinishReason.ABORT,
    RequestStatus.FINISHED_ERROR: FinishReason.ERROR,
}


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    # Tokens whose K/V are in the cache (prefix hits included).
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache at first admission (for usage reporting).
    num_cached_tokens: int | None = None
    num_preemptions: int = 0
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per-step logprobs of sampled tokens when asked for: (token_id, logprob, top [(id, logprob)]).
    output_logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    generator: torch.Generator | None = None
    # Draft tokens proposed for the next step (speculative decoding): not part of the output until
    # the target model verifies them. q of each when drafted by sampling (see spec.proposer).
    spec_token_ids: list[int] = field(default_factory=list)
    spec_draft_probs: torch.Tensor | None = None  # [len(spec_token_ids), vocab_size]

    def __post_init__(self) -> None:
        if self.sampling_params.seed is not None and self.generator is None:
            self.generator = torch.Generator()
            self.generator.manual_seed(self.sampling_params.seed % 2**64)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> FinishReason | None:
        return _FINISH_REASONS.get(self.status)
