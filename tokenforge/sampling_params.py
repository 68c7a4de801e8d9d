"""SamplingParams: how one request is decoded; validated on construction."""

from dataclasses import dataclass, field

from tokenforge.errors import InvalidRequestError

MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16  # each is searched for after every token, on the engine thread
MAX_STOP_STRING_CHARS = 256
MAX_SPECULATIVE_TOKENS = 16
# Temperatures below this are greedy: dividing logits by a subnormal number overflows to inf.
GREEDY_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int | None = None  # None: no limit
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI: logit -= presence * (count > 0)
    frequency_penalty: float = 0.0  # OpenAI: logit -= frequency * count
    repetition_penalty: float = 1.0  # CTRL/HF: divide positive, multiply negative logits
    logit_bias: dict[int, float] = field(default_factory=dict)
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k: the sampled token plus the top k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Speculative decoding for this request: None follows the engine, 0 turns it off, k caps the
    # drafted tokens per step at k (never above the engine's num_speculative_tokens).
    num_speculative_tokens: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def validate(self) -> None:
        def bad(message: str, param: str) -> InvalidRequestError:
            return InvalidRequestError(message, param=param)

        if self.n < 1:
            raise bad(f"n must be at least 1, got {self.n}", "n")
        if not 0.0 <= self.temperature <= 2.0:
            raise bad(f"temperature must be in [0, 2], got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k is not None and self.top_k < 1:
            raise bad(f"top_k must be at least 1 (or unset), got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {getattr(self, name)}", name)
        if self.repetition_penalty <= 0.0:
            raise bad("repetition_penalty must be positive", "repetition_penalty")
        for value in self.logit_bias.values():
            if not -100.0 <= value <= 100.0:
                raise bad(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0:
            raise bad("min_tokens must not be negative", "min_tokens")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens must not exceed max_tokens", "min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise bad(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "logprobs")
        if any(not s for s in self.stop):
            raise bad("stop strings must not be empty", "stop")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise bad(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}", "stop")
        if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
            raise bad(f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters", "stop")
        if self.num_speculative_tokens is not None and not 0 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS:
            raise bad(f"num_speculative_tokens must be in [0, {MAX_SPECULATIVE_TOKENS}]", "num_speculative_tokens")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise bad("seed is out of range", "seed")

    def validate_for_vocab(self, vocab_size: int) -> None:
        """Checks the token ids a request names against the model's vocabulary; a top_k past the
        vocabulary means no limit."""
        if self.top_k is not None and self.top_k >= vocab_size:
            self.top_k = None
        for token_id in list(self.logit_bias) + self.stop_token_ids:
            if not 0 <= token_id < vocab_size:
                raise InvalidRequestError(
                    f"token id {token_id} is outside the vocabulary [0, {vocab_size})",
                    param="logit_bias" if token_id in self.logit_bias else "stop_token_ids",
                )
