"""The official openai SDK against the server: chat, streaming, n, logprobs, stop, seed, completions, models."""

from tests.integration.server.conftest import MODEL

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
GREEDY = {"temperature": 0.0, "extra_body": {"ignore_eos": True}}


def test_chat(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, **GREEDY)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == MODEL
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    usage = response.usage
    assert usage.completion_tokens == 6
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_content_parts_and_cached_tokens(client):
    parts = [{"role": "system", "content": [{"type": "text", "text": "You are terse."}]},
             {"role": "user", "content": [{"type": "text", "text": "Name a colour."}]}]
    first = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=2, **GREEDY)
    again = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **GREEDY)
    assert first.choices[0].message.content == again.choices[0].message.content
    # The same prompt again: its full blocks come from the prefix cache.
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_history_with_a_response_message(client):
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, **GREEDY)
    # The SDK sends the message back as it came, refusal: null included.
    history = [*MESSAGES, first.choices[0].message, {"role": "user", "content": "Another."}]
    again = client.chat.completions.create(model=MODEL, messages=history, max_tokens=3, **GREEDY)
    assert again.usage.prompt_tokens > first.usage.prompt_tokens + 3


def test_stream_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, **GREEDY)
    assert text == whole.choices[0].message.content


def test_n_choices(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4, seed=7,
                                              temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 8  # prompt tokens count once, completions per choice
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=4, stream=True, **GREEDY)
    finished = {c.choices[0].index: c.choices[0].finish_reason
                for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, logprobs=True,
                                              top_logprobs=3, **GREEDY)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert len(content) == response.usage.completion_tokens == 5
    assert "".join(t.token for t in content) == choice.message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert bytes(entry.bytes).decode() == entry.token
        # Greedy: the sampled token is the most likely one.
        assert entry.logprob == max(t.logprob for t in entry.top_logprobs)


def test_stop(client):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, **GREEDY)
    text = full.choices[0].message.content
    stop = text.split()[1]
    stopped = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, stop=[stop, "zzz"],
                                             **GREEDY)
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[: text.index(stop)]


def test_seed_reproduces(client):
    def sample() -> str:
        response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0,
                                                  seed=1234, extra_body={"ignore_eos": True})
        return response.choices[0].message.content

    assert sample() == sample()


def test_completions(client):
    response = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4,
                                         temperature=0.0, logprobs=2)
    assert response.id.startswith("cmpl-") and response.object == "text_completion"
    choice = response.choices[0]
    assert choice.finish_reason in ("length", "stop")
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == response.usage.completion_tokens
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset[0] == 0 and all(len(top) == 2 for top in logprobs.top_logprobs)

    echoed = client.completions.create(model=MODEL, prompt=["Hello", "One, two,"], max_tokens=3, temperature=0.0,
                                       echo=True, extra_body={"ignore_eos": True})
    assert [c.index for c in echoed.choices] == [0, 1]
    assert echoed.choices[0].text.startswith("Hello") and echoed.choices[1].text.startswith("One, two,")
    assert echoed.usage.completion_tokens == 6


def test_completions_token_ids_and_stream(client, server):
    token_ids = server.core.tokenizer.encode("Once upon a time")
    whole = client.completions.create(model=MODEL, prompt=token_ids, max_tokens=4, temperature=0.0)
    stream = client.completions.create(model=MODEL, prompt=[token_ids], max_tokens=4, temperature=0.0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.prompt_tokens == len(token_ids)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_logit_bias_penalties_and_user(client, server):
    token_id = server.core.tokenizer.encode(" blue")[0]
    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3,
                                              logit_bias={str(token_id): 100}, presence_penalty=0.5,
                                              frequency_penalty=0.5, user="team-a", **GREEDY)
    assert response.choices[0].message.content == " blue" * 3
