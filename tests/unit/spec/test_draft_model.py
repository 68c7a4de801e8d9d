"""The draft model must share the target's vocabulary: a mismatch is refused with a clear error."""

import dataclasses

import pytest

from tokenforge.errors import ConfigError
from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.loader import LoadedModel
from tokenforge.spec.draft_model import check_vocab_match


class VocabTokenizer:
    def __init__(self, vocab: dict[str, int]):
        self.vocab = vocab

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)


def make_loaded(vocab_size: int = 4, vocab: dict[str, int] | None = None) -> LoadedModel:
    arch = ArchConfig.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": vocab_size,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    })
    tokenizer = None if vocab is None else VocabTokenizer(vocab)
    return LoadedModel(model=None, arch_config=arch, tokenizer=tokenizer, path=None)


VOCAB = {"a": 0, "b": 1, "c": 2, "d": 3}


def test_same_vocabulary_passes():
    check_vocab_match(make_loaded(vocab=VOCAB), make_loaded(vocab=dict(VOCAB)))
    check_vocab_match(make_loaded(), make_loaded())  # no tokenizers: sizes are all there is


def test_different_sizes_are_refused():
    with pytest.raises(ConfigError, match="vocabulary has 5 ids, the target's 4"):
        check_vocab_match(make_loaded(4), make_loaded(5))


def test_same_size_but_other_tokens_are_refused():
    swapped = {**VOCAB, "c": 3, "d": 2}
    with pytest.raises(ConfigError, match="tokenizer differs"):
        check_vocab_match(make_loaded(vocab=VOCAB), make_loaded(vocab=swapped))


def test_arch_replace_keeps_the_check_honest():
    loaded = make_loaded(vocab=VOCAB)
    other = dataclasses.replace(loaded, tokenizer=VocabTokenizer({**VOCAB, "e": 4}))
    with pytest.raises(ConfigError):
        check_vocab_match(loaded, other)
