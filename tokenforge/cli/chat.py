"""`tokenforge chat`: an interactive streaming chat in the terminal, against the local engine or,
with --url, a running OpenAI-compatible server. Reads one user message a line from stdin (a pipe
works too); `/reset` clears the history, `/exit` or end of input quits, Ctrl-C stops a reply.
"""

import argparse
import contextlib
import itertools
import sys
from collections.abc import Iterator
from typing import Protocol

from tokenforge.cli.engine_args import add_engine_args, engine_config_from_args
from tokenforge.config import DEFAULT_MODEL
from tokenforge.errors import TokenforgeError

EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"
HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


class ChatTurnError(TokenforgeError):
    """One turn failed (prompt over the context, server refused it); the chat goes on."""


class ChatBackend(Protocol):
    name: str

    def stream_reply(self, messages: list[dict]) -> Iterator[str]:
        """Yields the assistant's reply to `messages` piece by piece; raises ChatTurnError."""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("chat", help="interactive streaming chat (local engine or --url server)",
                                   description=__doc__)
    parser.add_argument("--url", default=None,
                        help="a running server's API base, e.g. http://127.0.0.1:8000/v1 (default: load the "
                             "model here; the engine options below apply only then)")
    parser.add_argument("--api-key", default="none", help="sent as the bearer token with --url")
    parser.add_argument("--system", default=None, help="a system prompt that starts every conversation")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--max-tokens", type=int, default=512, help="longest reply, in tokens")
    parser.add_argument("--seed", type=int, default=None)
    add_engine_args(parser)
    # None tells "not given": with --url the server's own model is asked for.
    parser.set_defaults(model=None)
    return parser


def run(args: argparse.Namespace) -> int:
    backend = RemoteBackend(args) if args.url else LocalBackend(args)
    print(f"Chatting with {backend.name}. {HELP}", file=sys.stderr)
    chat_loop(backend, args.system)
    return 0


def chat_loop(backend: ChatBackend, system: str | None) -> None:
    """Reads user lines until /exit or end of input; streams each reply to stdout."""
    history = start_history(system)
    prompt = ""
    if sys.stdin.isatty():
        prompt = "you> "
        with contextlib.suppress(ImportError):
            import readline  # noqa: F401 - line editing and history for input()
    while True:
        try:
            line = input(prompt).strip()
        except EOFError:
            break
        if not line:
            continue
        if line in EXIT_COMMANDS:
            break
        if line == RESET_COMMAND:
            history = start_history(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/"):
            print(f"unknown command {line.split()[0]!r}: {HELP}", file=sys.stderr)
            continue
        reply = stream_turn(backend, history + [{"role": "user", "content": line}])
        if reply is not None:
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


def start_history(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def stream_turn(backend: ChatBackend, messages: list[dict]) -> str | None:
    """Prints the reply as it streams; None when the turn failed or was interrupted (history unchanged)."""
    pieces: list[str] = []
    try:
        # closing(): a Ctrl-C that lands outside the generator must still end the request.
        with contextlib.closing(backend.stream_reply(messages)) as reply:
            for piece in reply:
                pieces.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
    except ChatTurnError as exc:
        end_line(pieces)
        print(f"error: {exc}", file=sys.stderr)
        return None
    except KeyboardInterrupt:
        end_line(pieces)
        print("(reply interrupted and dropped)", file=sys.stderr)
        return None
    print()
    return "".join(pieces)


def end_line(pieces: list[str]) -> None:
    if pieces:
        print()


class LocalBackend:
    """Loads the model in this process and steps the EngineCore itself, one request at a time."""

    def __init__(self, args: argparse.Namespace):
        from rich.console import Console

        from tokenforge.engine.factory import build_engine_core
        from tokenforge.engine.llm import LLM
        from tokenforge.sampling_params import SamplingParams

        args.model = args.model or DEFAULT_MODEL
        with Console(stderr=True).status(f"Loading {args.model} ..."):
            self.core = build_engine_core(engine_config_from_args(args))
        self.llm = LLM(engine=self.core)  # for its chat template
        self.params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                                     seed=args.seed)
        self.name = f"{args.model} (local, context {self.core.max_model_len} tokens)"
        self._request_ids = (f"chat-{i}" for i in itertools.count())

    def stream_reply(self, messages: list[dict]) -> Iterator[str]:
        try:
            request = self.core.make_request(next(self._request_ids), self.llm.apply_chat_template(messages),
                                             self.params)
        except TokenforgeError as exc:
            raise ChatTurnError(f"{exc} (/reset starts over)") from exc
        self.core.add_request(request)
        try:
            while self.core.has_unfinished_requests():
                for out in self.core.step():
                    if out.error is not None:
                        raise ChatTurnError(out.error)
                    if out.new_text:
                        yield out.new_text
        finally:
            # Ctrl-C, or a caller that stops reading: free the request's KV blocks.
            if self.core.has_unfinished_requests():
                self.core.abort_request(request.request_id)


class RemoteBackend:
    """Streams from a running server through the official `openai` SDK."""

    def __init__(self, args: argparse.Namespace):
        try:
            import openai
        except ImportError:
            raise TokenforgeError("chat --url needs the openai package: pip install openai") from None
        self.openai = openai
        self.client = openai.OpenAI(base_url=args.url, api_key=args.api_key, max_retries=0)
        self.model = args.model or self._served_model(args.url)
        self.options = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
        if args.seed is not None:
            self.options["seed"] = args.seed
        self.name = f"{self.model} at {args.url}"

    def _served_model(self, url: str) -> str:
        try:
            models = self.client.models.list().data
        except self.openai.APIError as exc:
            raise TokenforgeError(f"cannot list the models at {url}: {exc}") from exc
        if not models:
            raise TokenforgeError(f"the server at {url} serves no model")
        return models[0].id

    def stream_reply(self, messages: list[dict]) -> Iterator[str]:
        try:
            stream = self.client.chat.completions.create(model=self.model, messages=messages, stream=True,
                                                         **self.options)
            with stream:  # leaving early (Ctrl-C) closes the connection; the server aborts the request
                for chunk in stream:
                    for choice in chunk.choices:
                        if choice.delta.content:
                            yield choice.delta.content
        except self.openai.APIError as exc:
            raise ChatTurnError(describe_api_error(exc)) from exc


def describe_api_error(exc) -> str:
    """The server's OpenAI-shaped message when there is one, else the SDK's."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    return str(exc)
