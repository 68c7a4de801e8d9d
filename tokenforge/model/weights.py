"""Checkpoint tensor names -> our parameters (fused qkv and gate_up), for GGUF and HF names."""

import re

import torch

# (pattern, parameter name, shard) where shard is the part of a fused parameter the tensor fills.
_GGUF_NAMES = [
    (r"token_embd\.weight", "embed_tokens.weight", None),
    (r"output_norm\.weight", "norm.weight", None),
    (r"output\.weight", "lm_head.weight", None),
    (r"blk\.(\d+)\.attn_norm\.weight", "layers.{}.input_layernorm.weight", None),
    (r"blk\.(\d+)\.ffn_norm\.weight", "layers.{}.post_attention_layernorm.weight", None),
    (r"blk\.(\d+)\.attn_([qkv])\.(weight|bias)", "layers.{}.self_attn.qkv_proj.{}", "qkv"),
    (r"blk\.(\d+)\.attn_output\.weight", "layers.{}.self_attn.o_proj.weight", None),
    (r"blk\.(\d+)\.ffn_(gate|up)\.weight", "layers.{}.mlp.gate_up_proj.weight", "gate_up"),
    (r"blk\.(\d+)\.ffn_down\.weight", "layers.{}.mlp.down_proj.weight", None),
]
_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "embed_tokens.weight", None),
    (r"model\.norm\.weight", "norm.weight", None),
    (r"lm_head\.weight", "lm_head.weight", None),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "layers.{}.input_layernorm.weight", None),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "layers.{}.post_attention_layernorm.weight", None),
    (r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", "layers.{}.self_attn.qkv_proj.{}", "qkv"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "layers.{}.self_attn.o_proj.weight", None),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up)_proj\.weight", "layers.{}.mlp.gate_up_proj.weight", "gate_up"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "layers.{}.mlp.down_proj.weight", None),
]
_COMPILED = {
    "gguf": [(re.compile(p + "$"), t, s) for p, t, s in _GGUF_NAMES],
    "hf": [(re.compile(p + "$"), t, s) for p, t, s in _HF_NAMES],
}


def map_name(name: str, flavor: str) -> tuple[str, str | None] | None:
    """Checkpoint name -> (parameter name, part of a fused parameter: q/k/v/gate/up or None)."""
    for pattern, target, shard in _COMPILED[flavor]:
        match = pattern.match(name)
        if match is None:
            continue
        groups = match.groups()
        if shard == "qkv":
            return target.format(groups[0], groups[2]), groups[1]
        if shard == "gate_up":
            return target.format(groups[0]), groups[1]
        return target.format(*groups), None
    return None


def shard_rows(part: str | None, q_size: int, kv_size: int, intermediate_size: int) -> slice | None:
    """Rows of a fused parameter that a q/k/v or gate/up tensor fills."""
    rows = {
        "q": slice(0, q_size),
        "k": slice(q_size, q_size + kv_size),
        "v": slice(q_size + kv_size, q_size + 2 * kv_size),
        "gate": slice(0, intermediate_size),
        "up": slice(intermediate_size, 2 * intermediate_size),
    }
    return None if part is None else rows[part]


def unpermute_rope(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes llama.cpp's q/k row interleave (GGUF rotary layout) back to the rotate-half layout."""
    rows = weight.shape[0]
    half = rows // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)
