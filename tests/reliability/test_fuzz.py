"""Schema-driven fuzzing: schemathesis generates requests from the server's own /openapi.json, valid
ones and invalid ones, and sends them over real HTTP on loopback. No response may be a 5xx other
than a documented 503, every 4xx is in OpenAI's error shape, and the server is healthy at the end.

Bounded for CI: EXAMPLES cases per operation and generation mode, all within BUDGET_S per server,
derandomized. TOKENFORGE_FUZZ_EXAMPLES=200 (and optionally TOKENFORGE_FUZZ_BUDGET_S) runs a longer,
random search.
"""

import os
import time
from collections import Counter

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

from tests.integration.server.conftest import MODEL
from tests.reliability.small_servers import small_control_server, small_server  # noqa: F401 - fixtures

LONG_RUN = "TOKENFORGE_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("TOKENFORGE_FUZZ_EXAMPLES", "15"))
BUDGET_S = float(os.environ.get("TOKENFORGE_FUZZ_BUDGET_S", "1800" if LONG_RUN else "30"))
MAX_TOKENS = 2  # a generated request decodes at most this many tokens a choice
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
MAX_TOKENS_FIELDS = ("max_tokens", "max_completion_tokens")
DOCUMENTED_503_CODES = frozenset({"overloaded", "engine_step_failed", "engine_unavailable", "store_unavailable",
                                  "shutting_down"})
MAX_REPORTED = 20
# What the server refuses by design (README "Not yet"): left out of valid cases, so that they get further.
UNSUPPORTED_CHAT_FIELDS = ("tools", "tool_choice", "functions", "function_call", "response_format", "modalities",
                           "audio", "web_search_options")
UNSUPPORTED_MESSAGE_FIELDS = ("tool_calls", "function_call", "audio")


def capped_max_tokens(value):
    """`value` as a max_tokens no larger than MAX_TOKENS (unset means "up to the context", so it is
    set); what is no number at all is left as it is, for the server to refuse."""
    if value is None:
        return MAX_TOKENS
    if isinstance(value, bool):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return value
    return MAX_TOKENS if number > MAX_TOKENS else value


def steer(case: schemathesis.Case, mode: GenerationMode) -> None:
    """Keeps a generated chat or completion request short (the fuzzer looks for crashes, not text).
    A valid case names the served model and leaves out what the server refuses by design, so that it
    reaches the engine rather than a 404 or a 400."""
    if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
        if "model" in case.body:
            case.body["model"] = MODEL
        if case.path == "/v1/chat/completions":
            for name in UNSUPPORTED_CHAT_FIELDS:
                case.body.pop(name, None)
            for message in case.body.get("messages", []):
                for name in UNSUPPORTED_MESSAGE_FIELDS:
                    message.pop(name, None)
                if message.get("content") is None:
                    message["content"] = "Hi"
    if case.path in GENERATION_PATHS and isinstance(case.body, dict):
        for name in MAX_TOKENS_FIELDS:
            if name in case.body or name == "max_tokens":
                case.body[name] = capped_max_tokens(case.body.get(name))


def header(response, name: str) -> str | None:
    values = response.headers.get(name)
    return values[0] if values else None


def problem_of(case: schemathesis.Case, response) -> str | None:
    """What is wrong with the server's answer to `case`, or None."""
    status = response.status_code
    if status >= 500 and status != 503:
        return f"{status}: {response.text[:300]}"
    if status >= 400:
        try:
            body = response.json()
            error = body["error"]
        except (ValueError, TypeError, KeyError):
            return f"{status} not in OpenAI's error shape: {response.text[:300]}"
        if set(body) != {"error"} or set(error) != {"message", "type", "param", "code"} or not error["message"]:
            return f"{status} not in OpenAI's error shape: {response.text[:300]}"
        if status == 503 and (error["code"] not in DOCUMENTED_503_CODES or header(response, "retry-after") is None):
            return f"undocumented 503: {response.text[:300]}"
        return None
    if case.path in GENERATION_PATHS and isinstance(case.body, dict) and case.body.get("stream") is True:
        if not response.text.endswith("data: [DONE]\n\n"):
            return f"{status} stream without its [DONE]: {response.text[-300:]}"
    elif (header(response, "content-type") or "").startswith("application/json"):
        try:
            response.json()
        except ValueError:
            return f"{status} with a body that is not JSON: {response.text[:300]}"
    return None


def modes_of(operation: schemathesis.APIOperation) -> tuple[GenerationMode, ...]:
    """Valid cases always; invalid ones where there is a body, query or header to break (a path
    parameter is any string, so an operation with only those has no invalid case to send)."""
    if operation.body or operation.query or operation.headers:
        return GenerationMode.POSITIVE, GenerationMode.NEGATIVE
    return (GenerationMode.POSITIVE,)


def fuzz(base_url: str, headers: dict[str, str]) -> tuple[Counter, list[str], set[str]]:
    """Fuzzes every operation of the server's schema, positive and negative cases, within BUDGET_S:
    (statuses seen, problems found, labels of the operations that were called)."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    runs = [(operation, mode) for operation in operations for mode in modes_of(operation)]
    statuses: Counter = Counter()
    problems: list[str] = []
    called: set[str] = set()
    deadline = time.monotonic() + BUDGET_S
    for k, (operation, mode) in enumerate(runs):
        # Each run gets its share of the time left, and at least one call.
        run_deadline = time.monotonic() + max(0.0, deadline - time.monotonic()) / (len(runs) - k)
        num_calls = 0

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=not LONG_RUN,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(mode))
        def run(case: schemathesis.Case) -> None:
            nonlocal num_calls
            if num_calls and time.monotonic() > run_deadline:
                return
            num_calls += 1
            steer(case, mode)
            try:
                response = case.call(base_url=base_url, headers=headers, timeout=60)
            except Exception as exc:  # noqa: BLE001 - a dropped connection is a finding, not a test error
                problems.append(f"{operation.label} ({mode.value}): no response ({exc!r})\n  {case.as_curl_command()}")
                return
            called.add(operation.label)
            statuses[response.status_code] += 1
            problem = problem_of(case, response)
            if problem is not None:
                problems.append(f"{operation.label} ({mode.value}): {problem}\n  {case.as_curl_command()}")

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            pass  # nothing to make invalid (an operation without parameters or body)
    return statuses, problems, {operation.label for operation in operations} - called


def assert_fuzzed_and_alive(base_url: str, headers: dict[str, str]) -> None:
    statuses, problems, never_called = fuzz(base_url, headers)
    print(f"fuzz {base_url}: statuses {dict(sorted(statuses.items()))}")
    assert not problems, f"{len(problems)} problems:\n" + "\n".join(problems[:MAX_REPORTED])
    assert not never_called, never_called
    with httpx.Client(base_url=base_url, headers=headers, timeout=60) as http:
        assert http.get("/health").status_code == 200
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        assert http.post("/v1/chat/completions", json=chat).status_code == 200


@pytest.mark.slow
def test_fuzz_server(small_server):
    assert_fuzzed_and_alive(small_server.base_url, {})


@pytest.mark.slow
def test_fuzz_server_with_keys(small_control_server):
    """The operator's admin key also opens the admin routes, so they are fuzzed too."""
    assert_fuzzed_and_alive(small_control_server.base_url,
                            {"authorization": f"Bearer {small_control_server.admin_key}"})
