"""SSE framing byte for byte as OpenAI sends it: `data: <json>\n\n` events, `data: [DONE]\n\n` last."""

import json

from tests.integration.server.conftest import MODEL

MESSAGES = [{"role": "user", "content": "Say hello."}]


def read_events(http, path: str, body: dict) -> tuple[dict, bytes]:
    with http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return response.headers, response.read()


def split_events(raw: bytes) -> list[dict]:
    """Every event is exactly one `data: ` line and a blank line; the stream ends with [DONE]."""
    assert raw.endswith(b"data: [DONE]\n\n")
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = []
    for event in events[:-2]:
        assert event.startswith(b"data: ") and b"\n" not in event, event
        payloads.append(json.loads(event[len(b"data: "):]))
    return payloads


def test_chat_stream_framing(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    headers, raw = read_events(http, "/v1/chat/completions", body)
    assert headers["x-request-id"]
    chunks = split_events(raw)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    choice_chunks = [c for c in chunks if c["choices"]]
    assert all(c["choices"][0]["finish_reason"] is None for c in choice_chunks[:-1])
    assert choice_chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 4
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_stream_without_usage_has_no_usage_field(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "stream": True}
    chunks = split_events(read_events(http, "/v1/chat/completions", body)[1])
    assert all("usage" not in c and c["choices"] for c in chunks)


def test_completion_stream_framing(http):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True, "echo": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    chunks = split_events(read_events(http, "/v1/completions", body)[1])
    assert all(c["object"] == "text_completion" for c in chunks)
    assert chunks[0]["choices"][0]["text"] == "Hello"  # the echo comes first
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
