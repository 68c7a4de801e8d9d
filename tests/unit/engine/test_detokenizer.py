"""IncrementalDetokenizer against the default model's real byte-level BPE tokenizer."""

import pytest

from tokenforge.config import default_cache_dir
from tokenforge.engine.detokenizer import IncrementalDetokenizer
from tokenforge.model.gguf_file import load_tokenizer
from tokenforge.sampling_params import SamplingParams

UNICODE_TEXT = "héllo 日本語 🤖🚀 naïve"
ANSWER_TEXT = "The answer is 42. Done."  # 'The', ' answer', ' is', ' ', '4', '2', '.', ' Done', '.'
IM_END_ID = 2
CHAT_PROMPT = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def tokenizer(smollm2_path):
    """The default model's tokenizer, as the loader reads it from the pulled GGUF (cached after once)."""
    return load_tokenizer(smollm2_path, default_cache_dir())


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def make_detokenizer(tokenizer, prompt: str = CHAT_PROMPT, **params) -> IncrementalDetokenizer:
    return IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt), SamplingParams(**params))


def stream(detokenizer, token_ids: list[int], chunk: int = 1):
    """Feeds token ids `chunk` at a time; returns (deltas, matched stop string). Calls finish()
    when no stop string matched, as the engine does at max_tokens or EOS."""
    deltas = []
    for start in range(0, len(token_ids), chunk):
        stop = detokenizer.update(token_ids[start : start + chunk])
        deltas.append(detokenizer.take_delta())
        if stop is not None:
            return deltas, stop
    detokenizer.finish()
    deltas.append(detokenizer.take_delta())
    return deltas, None


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_streaming_unicode_matches_full_decode(tokenizer, chunk):
    token_ids = encode(tokenizer, UNICODE_TEXT)
    # The test means something only if single tokens split characters.
    assert any("\ufffd" in tokenizer.decode([i]) for i in token_ids)
    detokenizer = make_detokenizer(tokenizer)
    deltas, stop = stream(detokenizer, token_ids, chunk)
    assert stop is None
    assert "".join(deltas) == tokenizer.decode(token_ids) == UNICODE_TEXT
    assert not any("\ufffd" in delta for delta in deltas)
    assert detokenizer.output_text == UNICODE_TEXT


def test_prompt_context_does_not_leak_into_output(tokenizer):
    for prompt in ["", "x", "日本", CHAT_PROMPT]:
        deltas, _ = stream(make_detokenizer(tokenizer, prompt), encode(tokenizer, " and 語"))
        assert "".join(deltas) == " and 語"


def test_each_step_decodes_a_small_window(tokenizer):
    class CountingTokenizer:
        def __init__(self, inner):
            self.inner = inner
            self.max_window = 0

        def __len__(self):
            return len(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def convert_tokens_to_string(self, tokens):
            self.max_window = max(self.max_window, len(tokens))
            return self.inner.convert_tokens_to_string(tokens)

    counting = CountingTokenizer(tokenizer)
    token_ids = encode(tokenizer, UNICODE_TEXT * 30)
    detokenizer = IncrementalDetokenizer(counting, encode(tokenizer, CHAT_PROMPT), SamplingParams())
    deltas, _ = stream(detokenizer, token_ids)
    assert "".join(deltas) == UNICODE_TEXT * 30
    assert counting.max_window <= 8 < len(token_ids)


def assert_never_ahead(deltas: list[str], output: str) -> None:
    """Every intermediate emission is a prefix of the final output, so no part of a stop
    string that the output excludes was ever emitted."""
    emitted = ""
    for delta in deltas:
        emitted += delta
        assert output.startswith(emitted), (emitted, output)
    assert emitted == output


@pytest.mark.parametrize(
    ("text", "stop", "output"),
    [
        (ANSWER_TEXT, "answer is", "The "),  # across ' answer' + ' is'
        (ANSWER_TEXT, "swer is 4", "The an"),  # starts and ends inside tokens
        (ANSWER_TEXT, "42", "The answer is "),  # across '4' + '2'
        ("go 🤖🚀 now", "🚀", "go 🤖"),  # a character split over three tokens
        ("go 🤖🚀 now", "🚀 n", "go 🤖"),
    ],
)
def test_stop_string_across_tokens_is_caught_and_excluded(tokenizer, text, stop, output):
    token_ids = encode(tokenizer, text)
    assert not any(stop in tokenizer.decode([i]) for i in token_ids)
    detokenizer = make_detokenizer(tokenizer, stop=[stop])
    deltas, matched = stream(detokenizer, token_ids)
    assert matched == stop
    assert_never_ahead(deltas, output)
    assert detokenizer.output_text == output


def test_held_back_stop_prefix_is_released_when_it_does_not_match(tokenizer):
    detokenizer = make_detokenizer(tokenizer, stop=["answer was", "Done!"])
    emitted = []
    for token_id in encode(tokenizer, ANSWER_TEXT):
        assert detokenizer.update([token_id]) is None
        emitted.append(detokenizer.take_delta())
    # After ' answer' the tail may still become "answer was"; ' is' settles it.
    assert emitted[:3] == ["The", " ", "answer is"]
    # " Done" is held until '.' rules out "Done!".
    assert emitted[-2:] == [" ", "Done."]
    detokenizer.finish()
    assert detokenizer.take_delta() == ""
    assert "".join(emitted) == ANSWER_TEXT


@pytest.mark.parametrize("chunk", [1, 100])
def test_earliest_stop_string_wins(tokenizer, chunk):
    # Listed first but later in the text: with everything in one update both match.
    detokenizer = make_detokenizer(tokenizer, stop=["42", "answer", "Done"])
    deltas, matched = stream(detokenizer, encode(tokenizer, ANSWER_TEXT), chunk)
    assert matched == "answer"
    assert_never_ahead(deltas, "The ")


def test_overlapping_stop_strings_at_same_start_take_the_shorter(tokenizer):
    detokenizer = make_detokenizer(
        tokenizer, stop=["answer is", "answer"], include_stop_str_in_output=True
    )
    deltas, matched = stream(detokenizer, encode(tokenizer, ANSWER_TEXT), chunk=100)
    assert matched == "answer"
    assert "".join(deltas) == "The answer"


@pytest.mark.parametrize("chunk", [1, 100])
def test_include_stop_str_in_output(tokenizer, chunk):
    output = "The answer is"
    detokenizer = make_detokenizer(tokenizer, stop=["answer is"], include_stop_str_in_output=True)
    deltas, matched = stream(detokenizer, encode(tokenizer, ANSWER_TEXT), chunk)
    assert matched == "answer is"
    assert_never_ahead(deltas, output)
    assert detokenizer.output_text == output


def test_include_stop_str_truncates_text_after_it_in_the_same_token(tokenizer):
    detokenizer = make_detokenizer(tokenizer, stop=["nsw"], include_stop_str_in_output=True)
    deltas, matched = stream(detokenizer, encode(tokenizer, ANSWER_TEXT))
    assert matched == "nsw"
    assert "".join(deltas) == detokenizer.output_text == "The answ"


def test_updates_after_a_stop_change_nothing(tokenizer):
    detokenizer = make_detokenizer(tokenizer, stop=["answer"])
    assert detokenizer.update(encode(tokenizer, ANSWER_TEXT)) == "answer"
    assert detokenizer.take_delta() == "The "
    assert detokenizer.update(encode(tokenizer, " answer again")) is None
    detokenizer.finish()
    assert detokenizer.take_delta() == ""
    assert detokenizer.output_text == "The "


def test_finish_releases_held_back_stop_prefix(tokenizer):
    detokenizer = make_detokenizer(tokenizer, stop=["answer was"])
    assert detokenizer.update(encode(tokenizer, "The answer")) is None
    assert detokenizer.take_delta() == "The "
    assert detokenizer.output_text == "The "
    detokenizer.finish()
    assert detokenizer.output_text == "The answer"
    assert detokenizer.take_delta() == "answer"
    assert detokenizer.take_delta() == ""


def test_finish_releases_an_incomplete_character_as_decode_does(tokenizer):
    token_ids = encode(tokenizer, "go 🤖")[:-1]  # the robot's last byte never arrives
    detokenizer = make_detokenizer(tokenizer)
    assert detokenizer.update(token_ids) is None
    assert detokenizer.take_delta() == "go"
    detokenizer.finish()
    assert "go" + detokenizer.take_delta() == tokenizer.decode(token_ids)
    assert detokenizer.output_text.endswith("\ufffd")


@pytest.mark.parametrize(
    ("skip", "output"), [(True, "Hi there"), (False, "Hi<|im_end|> there<|endoftext|>")]
)
def test_skip_special_tokens(tokenizer, skip, output):
    token_ids = encode(tokenizer, "Hi") + [IM_END_ID] + encode(tokenizer, " there") + [0]
    detokenizer = make_detokenizer(tokenizer, skip_special_tokens=skip)
    deltas, _ = stream(detokenizer, token_ids)
    assert "".join(deltas) == output == tokenizer.decode(token_ids, skip_special_tokens=skip)


def test_skip_special_tokens_hides_every_special_added_token(tokenizer):
    # <file_sep> (5) is special in the vocabulary but not in all_special_ids.
    token_ids = encode(tokenizer, "a") + [5] + encode(tokenizer, "b")
    deltas, _ = stream(make_detokenizer(tokenizer), token_ids)
    assert "".join(deltas) == "ab" == tokenizer.decode(token_ids, skip_special_tokens=True)


def test_ids_outside_the_vocabulary_decode_to_nothing(tokenizer):
    token_ids = encode(tokenizer, "a") + [len(tokenizer) + 7] + encode(tokenizer, "b")
    deltas, _ = stream(make_detokenizer(tokenizer), token_ids)
    assert "".join(deltas) == "ab"
