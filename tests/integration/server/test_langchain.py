"""langchain-openai's ChatOpenAI against the server: invoke and stream."""

from langchain_openai import ChatOpenAI

from tests.integration.server.conftest import MODEL


def make_chat(server, **options) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0,
                      temperature=0.0, max_tokens=5, **options)


def test_invoke(server):
    message = make_chat(server).invoke("Name a colour.")
    assert isinstance(message.content, str) and message.content
    assert message.response_metadata["finish_reason"] in ("stop", "length")
    assert message.usage_metadata["output_tokens"] <= 5


def test_stream(server):
    chat = make_chat(server, stream_usage=True)
    chunks = list(chat.stream([("system", "You are terse."), ("human", "Name a colour.")]))
    text = "".join(chunk.content for chunk in chunks)
    whole = chat.invoke([("system", "You are terse."), ("human", "Name a colour.")])
    assert text == whole.content
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.usage_metadata["output_tokens"] == whole.usage_metadata["output_tokens"]
