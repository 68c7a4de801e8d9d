"""The OpenAI API's request and response bodies (field names as OpenAI spells them).

Requests forbid unknown fields (OpenAI answers 400 "Unrecognized request argument") and accept
vLLM's extra sampling fields (top_k, min_p, repetition_penalty, min_tokens, ignore_eos, ...).
"""

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from tokenforge.errors import InvalidRequestError
from tokenforge.sampling_params import MAX_TOP_LOGPROBS

MAX_N = 128  # OpenAI's bound on n


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(RequestModel):
    include_usage: bool = False


class TextPart(RequestModel):
    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
    # "developer" is OpenAI's newer name for "system"; tool messages need tool support first.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None  # None only for an assistant message
    name: str | None = None
    # Fields of an assistant message that SDKs send back with the history (a response's message).
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None


class SamplingRequest(RequestModel):
    """Fields shared by chat and completions; SamplingParams checks their ranges."""

    model: str | None = None  # None: the only served model (required when a server has several)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # vLLM's extra_body fields
    top_k: int | None = None  # -1 or 0 also mean "no limit", as in vLLM
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    # tokenforge: speculative decoding for this request (0: off; k: at most k drafts; None: the server's).
    num_speculative_tokens: int | None = None
    stop_token_ids: list[StrictInt] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # OpenAI fields accepted only when unset or harmless (see check_supported).
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: Any = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def check_supported(self) -> None:
        """Raises InvalidRequestError for features this server does not implement yet."""
        unsupported = {
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none", "auto"),
            "functions": bool(self.functions),
            "function_call": self.function_call not in (None, "none", "auto"),
            "response_format": self.response_format not in (None, {"type": "text"}),
            "modalities": self.modalities not in (None, ["text"]),
            "audio": self.audio is not None,
            "web_search_options": self.web_search_options is not None,
        }
        for name, bad in unsupported.items():
            if bad:
                raise InvalidRequestError(f"'{name}' is not supported by this server yet", param=name)
        for i, message in enumerate(self.messages):
            if message.tool_calls or message.function_call is not None or message.audio is not None:
                raise InvalidRequestError("tool calls and audio in messages are not supported by this server yet",
                                          param=f"messages[{i}]")
            if message.content is None and message.role != "assistant":
                raise InvalidRequestError(f"a {message.role} message needs content", param=f"messages[{i}].content")
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", param="top_logprobs")


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        if self.suffix:
            raise InvalidRequestError("'suffix' is not supported by this server yet", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported yet", param="best_of")
        if not self.prompt:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if self.echo and self.logprobs is not None:
            raise InvalidRequestError("echo with logprobs needs prompt logprobs, which this server does not "
                                      "compute yet", param="echo")


class TokenizeRequest(RequestModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(RequestModel):
    model: str | None = None
    tokens: list[StrictInt]


# -- responses --


def now_s() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now_s)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, str | None]  # {"role", "content"} first, then {"content"}, {} with finish_reason
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None  # serialised only when stream_options.include_usage


class LegacyLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: LegacyLogprobs | None = None
    finish_reason: str | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now_s)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now_s)
    owned_by: str = "tokenforge"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
