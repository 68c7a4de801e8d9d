"""The Llama family (Llama 2/3, SmolLM2, Mistral) over a paged KV cache; Qwen2 adds qkv bias."""

import torch
import torch.nn.functional as F
from torch import nn

from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.decode_plan import DecodePlan, fits_step
from tokenforge.model.layers.attention import AttentionMetadata, native_kv_cache, paged_attention, write_kv
from tokenforge.model.layers.native import layer_ops
from tokenforge.model.layers.norm import RMSNorm, runs_native
from tokenforge.model.layers.rotary import RotaryEmbedding, apply_rotary
from tokenforge.model.registry import register


class Attention(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        # q, k and v in one matmul: [q_size + 2 * kv_size, hidden]
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5
        self.ops = layer_ops()

    def forward(self, x, rope, kv_cache, meta: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        if self.ops is not None and runs_native(qkv) and qkv.is_contiguous() and native_kv_cache(kv_cache):
            # Rotates q and k in place and writes k and v into the cache: one native call.
            cos, sin = rope
            self.ops.rotary_write_kv(qkv.data_ptr(), qkv.shape[0], self.num_heads, self.num_kv_heads, self.head_dim,
                                     cos.data_ptr(), sin.data_ptr(), kv_cache.data_ptr(),
                                     kv_cache.dtype == torch.float16, kv_cache.shape[3],
                                     meta.slot_mapping.data_ptr(), torch.get_num_threads())
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q, k, v = (t.view(-1, n, self.head_dim) for t, n in ((q, self.num_heads), (k, self.num_kv_heads),
                                                                    (v, self.num_kv_heads)))
            o = paged_attention(q, k, v, kv_cache, meta, self.scale)
            return self.o_proj(o.view(-1, self.q_size))
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        # q and k heads rotated together: [num_tokens, num_heads + num_kv_heads, head_dim]
        qk = apply_rotary(qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim), *rope)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        write_kv(kv_cache, k, v, meta.slot_mapping)
        o = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(o.view(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

        self.ops = layer_ops()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if self.ops is not None and runs_native(gate_up) and gate_up.is_contiguous():
            hidden = torch.empty((*gate_up.shape[:-1], self.intermediate_size), dtype=torch.float32)
            self.ops.silu_mul(gate_up.data_ptr(), gate_up.numel() // (2 * self.intermediate_size),
                              self.intermediate_size, hidden.data_ptr(), torch.get_num_threads())
            return self.down_proj(hidden)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, delta, rope, kv_cache, meta) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream, delta: the last layer's output still to be added to it (None
        before the first layer). Returns the stream and this layer's MLP output, not yet added."""
        x, h = self.input_layernorm.add_norm(x, delta)
        x, h = self.post_attention_layernorm.add_norm(x, self.self_attn(h, rope, kv_cache, meta))
        return x, self.mlp(h)


@register("llama", "mistral", "qwen2")
class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ArchConfig):
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling
        )
        # given its (uninitialised) weight, nn.Embedding skips its normal_ init: on the meta device that
        # init imports torch._dynamo and sympy, ~60 MiB of resident memory for nothing
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, input_ids, positions, kv_caches: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions: [num_tokens]; kv_caches: [num_layers, 2, ...] -> hidden [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary.lookup(positions, x.dtype)
        if fits_step(x, kv_caches, meta):
            plan = self._decode_plan()
            if plan is not None and x.shape[0] <= plan.max_rows:  # all layers in one native call, the same bits
                return self.norm.add_norm(x, plan.run(x, kv_caches, meta, rope))[1]
        delta = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, delta = layer(x, delta, rope, kv_cache, meta)
        return self.norm.add_norm(x, delta)[1]

    def _decode_plan(self) -> DecodePlan | None:
        plan = getattr(self, "decode_plan", None)  # None until made (and in a deep copy), False: does not fit
        if plan is None or (plan and not plan.is_current(self)):
            plan = self.decode_plan = DecodePlan.make(self) or False
        return plan or None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[num_sampled, hidden] -> [num_sampled, vocab_size]; a tied head reuses the embedding."""
        if self.lm_head is None:
            return F.linear(hidden, self.embed_tokens.weight)
        return self.lm_head(hidden)
