"""The text and raw bytes of single tokens, as OpenAI's logprobs report them.

Byte-level BPE tokens (GPT-2, Llama 3, SmolLM2, Qwen2) map each byte to a printable character;
SentencePiece tokens write a space as "▁" and unknown bytes as "<0xAB>". A token that is part of
a multi-byte character has no text of its own: OpenAI writes it as "bytes:\\xe2\\x82".
"""

import re
from functools import lru_cache
from typing import Any

_SPM_SPACE = "\u2581"
_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """GPT-2's printable character -> byte table (the inverse of its bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return type(decoder).__name__ == "ByteLevel"


def token_bytes(token: str, byte_level: bool) -> bytes:
    """The bytes one token string stands for."""
    if byte_level:
        table = byte_decoder()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode()  # an added token written as plain text ("<|im_end|>")
    match = _SPM_BYTE.fullmatch(token)
    if match:
        return bytes([int(match.group(1), 16)])
    return token.replace(_SPM_SPACE, " ").encode()


def bytes_to_text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenTexts:
    """Cached (text, bytes) of token ids for one tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.byte_level = is_byte_level(tokenizer)
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def get(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            token = self.tokenizer.convert_ids_to_tokens(token_id) or ""
            raw = token_bytes(token, self.byte_level)
            cached = self._cache[token_id] = (bytes_to_text(raw), list(raw))
        return cached

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]
