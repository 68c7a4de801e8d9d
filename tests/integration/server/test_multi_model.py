"""One server, two models ("a" and "b", two engines over the same weights): routing by `model`,
/v1/models, per-model /health and metrics, and one engine dying while the other serves on."""

import httpx
import openai
import pytest

from tests.integration.server.conftest import make_server

NAMES = ("a", "b")
HI = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def two_models(smollm2_loaded):
    running = make_server(smollm2_loaded, names=NAMES, num_blocks=64)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def http(two_models):
    with httpx.Client(base_url=two_models.base_url, timeout=60) as client:
        yield client


def test_each_name_answers_chat_on_its_own_engine(two_models):
    client = openai.OpenAI(base_url=f"{two_models.base_url}/v1", api_key="unused", max_retries=0, timeout=60)
    for name in NAMES:
        queried = {n: core.kv_cache_manager.num_prefix_queried_tokens for n, core in two_models.cores.items()}
        response = client.chat.completions.create(model=name, messages=HI, max_tokens=3, temperature=0)
        assert response.model == name and response.choices[0].message.content
        for other, core in two_models.cores.items():
            # Only the named model's engine saw the prompt.
            assert (core.kv_cache_manager.num_prefix_queried_tokens > queried[other]) == (other == name)
    assert client.completions.create(model="b", prompt="Hello", max_tokens=2).model == "b"


def test_unknown_and_missing_model(http):
    unknown = http.post("/v1/chat/completions", json={"model": "c", "messages": HI, "max_tokens": 2})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    assert http.get("/v1/models/c").status_code == 404
    # With several models, `model` is required, as in OpenAI's API.
    missing = http.post("/v1/chat/completions", json={"messages": HI, "max_tokens": 2})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "model"
    assert http.post("/tokenize", json={"prompt": "Hi"}).status_code == 400
    tokens = http.post("/tokenize", json={"model": "b", "prompt": "Hi"}).json()["tokens"]
    assert http.post("/detokenize", json={"model": "a", "tokens": tokens}).json()["prompt"] == "Hi"


def test_models_lists_both(http):
    assert [card["id"] for card in http.get("/v1/models").json()["data"]] == list(NAMES)
    assert http.get("/v1/models/b").json()["id"] == "b"


def test_health_and_metrics_per_model(http):
    health = http.get("/health")
    assert health.status_code == 200
    assert health.json()["models"] == {"a": {"status": "ok"}, "b": {"status": "ok"}}
    text = http.get("/metrics").text
    for name in NAMES:
        assert f'tokenforge_engine_healthy{{model="{name}"}} 1.0' in text
        assert f'tokenforge_num_requests_running{{model="{name}"}}' in text


def test_one_dead_engine_turns_health_503_and_the_other_serves(smollm2_loaded):
    running = make_server(smollm2_loaded, names=NAMES, num_blocks=64)

    def failing_execute(scheduled):
        raise RuntimeError("injected forward failure")

    running.cores["b"].runner.execute = failing_execute
    try:
        with httpx.Client(base_url=running.base_url, timeout=30) as client:
            # A failing step is recovered from twice; the third failure in a row kills the loop.
            codes = [client.post("/v1/chat/completions", json={"model": "b", "messages": HI, "max_tokens": 4})
                     .json()["error"]["code"] for _ in range(3)]
            assert codes == ["engine_step_failed", "engine_step_failed", "engine_unavailable"]
            health = client.get("/health")
            assert health.status_code == 503 and health.headers["retry-after"]
            body = health.json()
            assert body["status"] == "unhealthy" and body["models"]["a"] == {"status": "ok"}
            assert body["models"]["b"]["status"] == "unhealthy"
            assert "injected forward failure" in body["models"]["b"]["error"]
            alive = client.post("/v1/chat/completions", json={"model": "a", "messages": HI, "max_tokens": 4})
            assert alive.status_code == 200 and alive.json()["choices"][0]["message"]["content"]
            assert 'tokenforge_engine_healthy{model="b"} 0.0' in client.get("/metrics").text
    finally:
        running.stop()
