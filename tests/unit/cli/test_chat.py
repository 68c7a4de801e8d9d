"""chat_loop over a fake backend: commands, history, a failed turn, Ctrl-C mid-reply (no weights)."""

import io
import sys

from tokenforge.cli.chat import ChatTurnError, chat_loop
from tokenforge.cli.main import build_parser


class FakeBackend:
    """Replies "<n messages>"; a user message "fail" fails the turn, "stop" is interrupted mid-reply."""
    name = "fake"

    def __init__(self):
        self.seen: list[list[dict]] = []
        self.num_closed = 0

    def stream_reply(self, messages):
        self.seen.append(messages)
        try:
            if messages[-1]["content"] == "fail":
                raise ChatTurnError("the prompt is too long")
            yield f"<{len(messages)}"
            if messages[-1]["content"] == "stop":
                raise KeyboardInterrupt
            yield ">"
        finally:
            self.num_closed += 1


def run_loop(monkeypatch, capsys, script: str, system: str | None = None) -> tuple[FakeBackend, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))
    backend = FakeBackend()
    chat_loop(backend, system)
    captured = capsys.readouterr()
    return backend, captured.out, captured.err


def test_history_grows_and_reset_clears_it(monkeypatch, capsys):
    backend, out, err = run_loop(monkeypatch, capsys, "a\n\n  b  \n/reset\nc\n/exit\nd\n", system="be brief")
    assert out == "<2>\n<4>\n<2>\n"
    assert backend.seen[1] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a"},
                               {"role": "assistant", "content": "<2>"}, {"role": "user", "content": "b"}]
    assert "(conversation cleared)" in err


def test_end_of_input_quits(monkeypatch, capsys):
    backend, out, _ = run_loop(monkeypatch, capsys, "a\nb")
    assert out == "<1>\n<3>\n" and len(backend.seen) == 2


def test_failed_and_interrupted_turns_leave_no_history(monkeypatch, capsys):
    backend, out, err = run_loop(monkeypatch, capsys, "fail\nstop\na\n")
    assert out == "<1\n<1>\n"  # the interrupted piece ends its line; the next turn starts from scratch
    assert "error: the prompt is too long" in err and "interrupted" in err
    assert backend.num_closed == 3  # every reply's generator was closed


def test_unknown_command_is_not_sent(monkeypatch, capsys):
    backend, out, err = run_loop(monkeypatch, capsys, "/help\n")
    assert backend.seen == [] and out == "" and "/reset clears" in err


def test_chat_options():
    args = build_parser().parse_args(["chat", "--url", "http://h:1/v1", "--system", "s", "--max-tokens", "9"])
    assert (args.url, args.system, args.max_tokens, args.model, args.temperature) == ("http://h:1/v1", "s", 9, None,
                                                                                      0.7)
