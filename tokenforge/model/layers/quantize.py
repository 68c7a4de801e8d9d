"""Which quantized layer each part of a model gets, for --quantization int8 | w8a8 | w8a8-block | int4
(CPU).

quantize_model(model, method) replaces every nn.Linear of a loaded model in place, and its token
embedding with int8 rows (Int8Embedding); a model whose output head is tied to its embedding gets a
quantized head that the embedding then shares (the codes are held once). linear_quantizer(method)
gives the same choice for one layer, for the loader, which quantizes layers as they fill.

int4 keeps the output head in int8 (two activation digits), as llama.cpp's Q4_0 files keep theirs
in 8 or 6 bits: SmolLM2's perplexity is +14% with an int8 head against +24% with a 4-bit one.
Layers whose input width is not a multiple of 32 stay int8 under int4, and under w8a8-block also
those whose output width is not a multiple of 8.
"""

from collections.abc import Callable

import torch
from torch import nn

from tokenforge.config import QUANTIZATIONS
from tokenforge.model.layers.block_layout import fits as block_fits
from tokenforge.model.layers.quant_block import Int8BlockLinear
from tokenforge.model.layers.quant_int4 import GROUP, Int4Linear
from tokenforge.model.layers.quant_linear import Int8Embedding, Int8Linear

HEAD = "lm_head"


def w8a8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    return Int8Linear(weight, bias, activation_digits=1)


def w8a8_block_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    return Int8BlockLinear(weight, bias) if block_fits(weight) else Int8Linear(weight, bias)


def int4_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Linear:
    return Int4Linear(weight, bias) if weight.shape[1] % GROUP == 0 else Int8Linear(weight, bias)


_LAYERS = {"int8": Int8Linear, "w8a8": w8a8_linear, "w8a8-block": w8a8_block_linear, "int4": int4_linear}
_HEADS = {"int8": Int8Linear, "w8a8": w8a8_linear, "w8a8-block": w8a8_block_linear, "int4": Int8Linear}


def _maker(method: str, name: str) -> Callable[[torch.Tensor, torch.Tensor | None], Int8Linear]:
    return _HEADS[method] if name.rpartition(".")[2] == HEAD else _LAYERS[method]


def linear_quantizer(method: str) -> Callable[[str, nn.Linear], Int8Linear]:
    """The function that turns the nn.Linear named `name` into `method`'s layer."""
    return lambda name, linear: _maker(method, name)(linear.weight, linear.bias)


def quantize_model(model: nn.Module, method: str) -> int:
    """Replaces the model's nn.Linear layers (and its tied output head) with `method`'s; returns
    how many layers it quantized. "none" changes nothing ("auto" is resolved by the caller)."""
    if method not in QUANTIZATIONS or method == "auto":
        raise ValueError(f"unknown quantization {method!r} (choose from {', '.join(QUANTIZATIONS)})")
    if method == "none":
        return 0
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _maker(method, name)(linear.weight, linear.bias))
    count = len(targets)
    embedding = getattr(model, "embed_tokens", None)
    if getattr(model, "lm_head", "absent") is None and isinstance(embedding, nn.Embedding):
        model.lm_head = _HEADS[method](embedding.weight, None)
        model.embed_tokens = Int8Embedding.sharing(model.lm_head)
        count += 1
    elif isinstance(embedding, nn.Embedding):
        model.embed_tokens = Int8Embedding.quantize(embedding.weight)
    return count
