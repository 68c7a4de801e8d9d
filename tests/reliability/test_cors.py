"""CORS is off by default: no response lets a browser page on another origin read it, and a
preflight is not answered with any Access-Control-Allow-* header."""

import httpx
import pytest

from tests.integration.server.conftest import MODEL
from tests.reliability.small_servers import openai_error, small_server  # noqa: F401 - a fixture

ORIGIN = "https://evil.example"


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.lower().startswith("access-control-")}


@pytest.fixture(scope="module")
def http(small_server):
    with httpx.Client(base_url=small_server.base_url, timeout=60, headers={"origin": ORIGIN}) as client:
        yield client


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", None),
    ("GET", "/health", None),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions", {"messages": "not a list"}),  # an error response
])
def test_no_cors_headers_on_responses(http, method, path, body):
    response = http.request(method, path, json=body)
    assert response.status_code in (200, 400), response.text
    assert cors_headers(response) == {}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/models"])
def test_preflight_is_not_answered(http, path):
    response = http.options(path, headers={"access-control-request-method": "POST",
                                           "access-control-request-headers": "authorization, content-type"})
    assert cors_headers(response) == {}
    assert response.status_code == 405  # no route takes OPTIONS: no CORS middleware answered it
    openai_error(response)
