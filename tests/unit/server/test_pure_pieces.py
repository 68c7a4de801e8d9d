"""The server's pure pieces: token texts, error mapping, SSE framing, request ids, prompts, usage, params."""

import json

import pytest
from fastapi.exceptions import RequestValidationError

from tokenforge.errors import EngineDeadError, InvalidRequestError, QueueFullError
from tokenforge.server.errors import APIError, to_api_error, validation_error
from tokenforge.server.generation import ChoiceState, check_context, make_sampling_params, make_usage
from tokenforge.server.middleware import pick_request_id
from tokenforge.server.protocol import ChatCompletionRequest, CompletionRequest
from tokenforge.server.serving_chat import messages_to_dicts
from tokenforge.server.serving_completions import split_prompts
from tokenforge.server.sse import DONE, event
from tokenforge.server.token_text import byte_decoder, bytes_to_text, token_bytes


def test_byte_decoder_covers_every_byte_once():
    table = byte_decoder()
    assert sorted(table.values()) == list(range(256))
    assert table["Ġ"] == ord(" ") and table["A"] == ord("A")


@pytest.mark.parametrize("token, byte_level, expected", [
    ("Ġhello", True, b" hello"),
    ("âĤ¬", True, "€".encode()),
    ("<|im_end|>", True, b"<|im_end|>"),
    ("\u2581Hi", False, b" Hi"),
    ("<0xE2>", False, b"\xe2"),
])
def test_token_bytes(token, byte_level, expected):
    assert token_bytes(token, byte_level) == expected


def test_partial_character_is_written_as_bytes():
    assert bytes_to_text(b"\xe2\x82") == "bytes:\\xe2\\x82"
    assert bytes_to_text(" é".encode()) == " é"


def test_error_mapping():
    assert to_api_error(InvalidRequestError("bad", param="top_p")).body() == {
        "error": {"message": "bad", "type": "invalid_request_error", "param": "top_p", "code": None}}
    full = to_api_error(QueueFullError("full"))
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    dead = to_api_error(EngineDeadError("gone"))
    assert dead.status_code == 503 and "retry-after" in dead.headers
    assert to_api_error(RuntimeError("boom")).status_code == 500
    not_found = APIError(404, "nope", code="model_not_found")
    assert to_api_error(not_found) is not_found


def test_validation_error_names_the_field():
    def first_error(loc, kind="int_parsing", msg="Input should be a valid integer"):
        return validation_error(RequestValidationError([{"loc": loc, "type": kind, "msg": msg}]))

    error = first_error(("body", "messages", 0, "content", "list[TextPart]", 1, "text"))
    assert error.status_code == 400 and error.param == "messages[0].content[1].text"
    assert first_error(("body", "stop", "str")).param == "stop"
    assert first_error(("body", "frobnicate"), "extra_forbidden").message.startswith("Unrecognized request argument")
    assert first_error(("body", 3), "json_invalid").param is None


def test_sse_framing():
    assert event(json.dumps({"a": 1})) == b'data: {"a": 1}\n\n'
    assert DONE == b"data: [DONE]\n\n"


@pytest.mark.parametrize("header, kept", [(b"abc-123", True), (b"x" * 129, False), (b"has space", False),
                                          (b"caf\xc3\xa9", False), (b"", False)])
def test_request_id(header, kept):
    chosen = pick_request_id([(b"X-Request-Id", header)])
    assert (chosen == header.decode("latin-1")) == kept
    assert chosen and len(chosen) <= 128
    assert pick_request_id([]) != pick_request_id([])


def test_prompt_shapes():
    assert split_prompts("hi") == ["hi"]
    assert split_prompts(["a", "b"]) == ["a", "b"]
    assert split_prompts([1, 2]) == [[1, 2]]
    assert split_prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_messages_to_dicts():
    req = ChatCompletionRequest(messages=[{"role": "developer", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}])
    assert messages_to_dicts(req.messages) == [{"role": "system", "content": "Be brief."},
                                               {"role": "user", "content": "a\nb"}]


def test_sampling_params_from_request():
    req = CompletionRequest(prompt="x", top_k=-1, logit_bias={"5": -100}, stop="END", seed=3, temperature=0)
    params = make_sampling_params(req, req.max_tokens, None, vocab_size=100)
    assert params.top_k is None and params.logit_bias == {5: -100.0} and params.stop == ["END"]
    assert params.max_tokens == 16 and params.greedy and params.seed == 3
    with pytest.raises(InvalidRequestError) as info:
        make_sampling_params(CompletionRequest(prompt="x", top_p=5), 16, None, vocab_size=100)
    assert info.value.param == "top_p"
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], num_speculative_tokens=0)
    assert make_sampling_params(chat, 8, None, vocab_size=100).num_speculative_tokens == 0
    assert make_sampling_params(CompletionRequest(prompt="x"), 8, None, vocab_size=100).num_speculative_tokens is None
    with pytest.raises(InvalidRequestError) as info:
        make_sampling_params(CompletionRequest(prompt="x", num_speculative_tokens=99), 8, None, vocab_size=100)
    assert info.value.param == "num_speculative_tokens"


def test_unsupported_features_are_refused():
    ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], response_format={"type": "text"},
                          tool_choice="none", parallel_tool_calls=False).check_supported()
    with pytest.raises(InvalidRequestError) as info:
        ChatCompletionRequest(messages=[{"role": "user", "content": "x"}],
                              response_format={"type": "json_object"}).check_supported()
    assert info.value.param == "response_format"


def test_context_check():
    check_context(10, 90, 100, "prompt")
    with pytest.raises(InvalidRequestError, match="maximum context length is 100") as info:
        check_context(10, 91, 100, "prompt")
    assert info.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError) as info:
        check_context(100, None, 100, "messages")
    assert info.value.param == "messages"


def test_usage_counts_each_prompt_once():
    choices = [ChoiceState(num_prompt_tokens=7, num_cached_tokens=4, num_output_tokens=3),
               ChoiceState(num_prompt_tokens=7, num_cached_tokens=7, num_output_tokens=2),
               ChoiceState(num_prompt_tokens=5, num_cached_tokens=0, num_output_tokens=1),
               ChoiceState(num_prompt_tokens=5, num_cached_tokens=5, num_output_tokens=1)]
    usage = make_usage(choices, n=2)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (12, 7, 19)
    assert usage.prompt_tokens_details.cached_tokens == 4
