"""Bad input gets its 4xx in OpenAI's error shape, never reaches the engine, and the server keeps serving."""

import pytest

from tests.integration.server.conftest import MODEL, wait_until_idle

USER = [{"role": "user", "content": "Hi"}]
LONG_TEXT = "hello " * 3000  # ~3,000 tokens, over the test server's 2,048-token context


def chat(**fields) -> dict:
    return {"model": MODEL, "messages": USER, "max_tokens": 2, **fields}


CHAT_CASES = [
    ("wrong type max_tokens", chat(max_tokens="ten"), 400, "max_tokens"),
    ("wrong type messages", chat(messages="hi"), 400, "messages"),
    ("wrong type temperature", chat(temperature="hot"), 400, "temperature"),
    ("unknown field", chat(frobnicate=1), 400, "frobnicate"),
    ("negative max_tokens", chat(max_tokens=-3), 400, "max_tokens"),
    ("zero max_tokens", chat(max_tokens=0), 400, "max_tokens"),
    ("zero max_completion_tokens", chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("n=0", chat(n=0), 400, "n"),
    ("n too large", chat(n=1000), 400, "n"),
    ("temperature=-1", chat(temperature=-1), 400, "temperature"),
    ("top_p=5", chat(top_p=5), 400, "top_p"),
    ("presence_penalty=3", chat(presence_penalty=3), 400, "presence_penalty"),
    ("empty messages", chat(messages=[]), 400, "messages"),
    ("role tool", chat(messages=[{"role": "tool", "content": "42", "tool_call_id": "x"}]), 400, "messages[0]"),
    ("image part", chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages[0].content"),
    ("missing messages", {"model": MODEL}, 400, "messages"),
    ("user message without content", chat(messages=[{"role": "user"}]), 400, "messages[0].content"),
    ("assistant tool calls", chat(messages=[*USER, {"role": "assistant", "tool_calls": [{"id": "c"}]}]), 400,
     "messages[1]"),
    ("logit_bias key", chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias token", chat(logit_bias={"999999999": 1}), 400, "logit_bias"),
    ("logit_bias value", chat(logit_bias={"5": 500}), 400, "logit_bias"),
    ("top_logprobs without logprobs", chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs too many", chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("empty stop string", chat(stop=[""]), 400, "stop"),
    ("tools", chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools"),
    ("prompt too long", chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "messages"),
    ("prompt + max_tokens too long", chat(max_tokens=5000), 400, "max_tokens"),
    ("unknown model", chat(model="gpt-4o"), 404, "model"),
]

COMPLETION_CASES = [
    ("empty prompt list", {"prompt": []}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("empty token list", {"prompt": [[]]}, 400, "prompt"),
    ("negative token id", {"prompt": [-1, 5]}, 400, "prompt"),
    ("negative token id with echo", {"prompt": [-1], "echo": True}, 400, "prompt"),
    ("token id over the vocabulary with echo", {"prompt": [10**9], "echo": True}, 400, "prompt"),
    ("17 stop strings", {"prompt": "Hi", "stop": ["x"] * 17}, 400, "stop"),
    ("a 1,000-character stop string", {"prompt": "Hi", "stop": ["y" * 1000]}, 400, "stop"),
    ("token id over the vocabulary", {"prompt": [10**9]}, 400, "prompt"),
    ("mixed prompt list", {"prompt": ["a", [1, 2]]}, 400, "prompt"),
    ("echo with logprobs", {"prompt": "Hi", "echo": True, "logprobs": 1}, 400, "echo"),
    ("prompt too long", {"prompt": LONG_TEXT}, 400, "prompt"),
    ("suffix", {"prompt": "Hi", "suffix": "end"}, 400, "suffix"),
    ("more sequences than the server holds", {"prompt": ["Hi"] * 100, "n": 20}, 400, "n"),
    ("unknown model", {"prompt": "Hi", "model": "davinci"}, 404, "model"),
]


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["x-request-id"]
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] is not None and error["param"].startswith(param), error
    return error


@pytest.mark.parametrize("name, body, status, param", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
def test_bad_chat_request(http, name, body, status, param):
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), status, param)
    if status == 404:
        assert error["code"] == "model_not_found"


@pytest.mark.parametrize("name, body, status, param", COMPLETION_CASES, ids=[c[0] for c in COMPLETION_CASES])
def test_bad_completion_request(http, name, body, status, param):
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL, **body}), status, param)


@pytest.mark.parametrize("raw", [b"{not json", b'{"messages": "\xff\xfe"}', b"", b"[1, 2]",
                                 b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}'])
def test_malformed_bodies(http, raw):
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_huge_body_is_refused(http):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * (10 << 20) + b'"}]}'
    response = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_openai_error(response, 413)


def test_other_endpoints_errors(http):
    assert_openai_error(http.get("/v1/no-such-route"), 404)
    assert_openai_error(http.get("/v1/chat/completions"), 405)
    assert_openai_error(http.get("/v1/models/no-such-model"), 404, "model")
    assert_openai_error(http.post("/tokenize", json={"prompt": "a", "messages": USER}), 400, "prompt")
    assert_openai_error(http.post("/detokenize", json={"tokens": [-5]}), 400, "tokens")


def test_request_ids(http):
    given = http.post("/v1/chat/completions", json=chat(max_tokens=0), headers={"x-request-id": "client-id-42"})
    assert given.status_code == 400 and given.headers["x-request-id"] == "client-id-42"
    ids = {http.get("/health").headers["x-request-id"], http.get("/metrics").headers["x-request-id"],
           http.post("/v1/chat/completions", json=chat(n=0)).headers["x-request-id"]}
    assert len(ids) == 3
    bodies = [http.post("/v1/chat/completions", json=chat(max_tokens=1)).json()["id"] for _ in range(2)]
    assert bodies[0] != bodies[1]


def test_server_still_serves_after_bad_input(http, server):
    assert wait_until_idle(server.core, server.engine)
    response = http.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
    assert http.get("/health").status_code == 200


def test_tokenize_round_trip(http):
    tokens = http.post("/tokenize", json={"prompt": "Hello world"}).json()
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 2048
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}
    templated = http.post("/tokenize", json={"messages": USER}).json()
    assert templated["count"] > tokens["count"]
