"""IncrementalDetokenizer: one request's generated token ids to text deltas, O(1) per token.

Holds back a character split across byte-level tokens until it is complete, and any tail of
the text that may be the start of a stop string; truncates the text at a matched stop string.
"""

from typing import Any

from tokenforge.sampling_params import SamplingParams

REPLACEMENT_CHAR = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
# Prompt tokens decoded in front of the first output token, so decoders that strip the leading
# space of a text's first token (SentencePiece "▁") see the output in context.
NUM_PROMPT_CONTEXT_TOKENS = 4


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.params = params
        self._vocab_size = len(tokenizer)
        self._skipped_ids = special_token_ids(tokenizer) if params.skip_special_tokens else set()
        self._max_stop_len = max((len(stop) for stop in params.stop), default=0)
        # Window of token strings, as in vLLM: [prefix_offset, read_offset) are already in
        # `_text` and only give context; [read_offset:] wait for a complete character.
        # Tokens before prefix_offset are dropped, so each step decodes a few tokens only.
        self._tokens = self._to_tokens(prompt_token_ids[-NUM_PROMPT_CONTEXT_TOKENS:])
        if self._decode(self._tokens).endswith(REPLACEMENT_CHAR):
            self._tokens = []  # a prompt ending mid-character would misalign the first delta
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)
        self._text = ""  # output text of complete characters, truncated at a stop string
        self._num_emitted_chars = 0  # chars of `_text` handed out by take_delta
        self._finished = False  # stopped or finished: nothing more is held back

    @property
    def output_text(self) -> str:
        """All text emitted or emittable so far."""
        return self._text[: len(self._text) - self._num_held_chars()]

    def update(self, new_token_ids: list[int], check_stop: bool = True) -> str | None:
        """Adds newly generated token ids; returns the stop string matched (the request must
        then finish), or None. With check_stop False the new text is not searched for stops."""
        if self._finished:
            return None
        num_old_chars = len(self._text)
        # One token at a time: a character left incomplete by the last token of a batch
        # must not hold back the text of the tokens before it.
        for token in self._to_tokens(new_token_ids):
            self._tokens.append(token)
            self._decode_window(flush=False)
        return self._check_stop(num_old_chars) if check_stop else None

    def take_delta(self) -> str:
        """Text that is safe to emit now and has not been emitted yet."""
        end = len(self._text) - self._num_held_chars()
        delta = self._text[self._num_emitted_chars : end]
        self._num_emitted_chars = max(end, self._num_emitted_chars)
        return delta

    def finish(self) -> None:
        """The request ended for another reason (length, EOS): releases held-back text, an
        incomplete character included (as U+FFFD, like tokenizer.decode), to take_delta."""
        if self._finished:
            return
        self._decode_window(flush=True)
        self._finished = True

    def _to_tokens(self, token_ids: list[int]) -> list[str]:
        # Ids outside the tokenizer's vocabulary (a model's padded embedding) decode to nothing.
        kept = [i for i in token_ids if 0 <= i < self._vocab_size and i not in self._skipped_ids]
        return [token or "" for token in self.tokenizer.convert_ids_to_tokens(kept)]

    def _decode(self, tokens: list[str]) -> str:
        return self.tokenizer.convert_tokens_to_string(tokens) if tokens else ""

    def _decode_window(self, flush: bool) -> None:
        """Appends the text of the tokens after read_offset once it ends in a whole character."""
        prefix_text = self._decode(self._tokens[self._prefix_offset : self._read_offset])
        text = self._decode(self._tokens[self._prefix_offset :])
        if not flush and (len(text) <= len(prefix_text) or text.endswith(REPLACEMENT_CHAR)):
            return
        # Decoding is prefix-stable once prefix_text ends in a whole character, so the new
        # text is what follows it.
        self._text += text[len(prefix_text) :]
        num_dropped = self._read_offset
        del self._tokens[:num_dropped]
        self._prefix_offset = 0
        self._read_offset = len(self._tokens)

    def _check_stop(self, num_old_chars: int) -> str | None:
        """Looks for stop strings ending in the new text; the earliest one wins."""
        if not self.params.stop or len(self._text) == num_old_chars:
            return None
        best: tuple[int, int, str] | None = None  # (start, end, stop)
        for stop in self.params.stop:
            # A match wholly inside the old text would have stopped an earlier update.
            start = self._text.find(stop, max(0, num_old_chars - len(stop) + 1))
            if start != -1:
                match = (start, start + len(stop), stop)
                best = match if best is None else min(best, match)
        if best is None:
            return None
        start, end, stop = best
        # The held-back tail covered every partial stop string, so start >= num_emitted_chars.
        assert start >= self._num_emitted_chars
        self._text = self._text[: end if self.params.include_stop_str_in_output else start]
        self._finished = True
        return stop

    def _num_held_chars(self) -> int:
        """Length of the longest tail of the text that is the start of a stop string."""
        if self._finished:
            return 0
        num_unemitted = len(self._text) - self._num_emitted_chars
        for n in range(min(self._max_stop_len - 1, num_unemitted), 0, -1):
            tail = self._text[-n:]
            if any(stop.startswith(tail) for stop in self.params.stop):
                return n
        return 0


def special_token_ids(tokenizer: Any) -> set[int]:
    """Ids that skip_special_tokens hides. The backend's decode drops every added token marked
    special, which can be more than all_special_ids (SmolLM2's <file_sep>, <gh_stars>, ...)."""
    added = getattr(tokenizer, "added_tokens_decoder", {})
    return set(tokenizer.all_special_ids) | {i for i, t in added.items() if t.special}
