"""DecodePlan: decode of a few tokens of a Llama-family model in one native call per step.

Where every linear layer is an int8 layer on the native row kernels and the model runs fp32 on the
CPU, a step of up to MAX_PLAN_ROWS tokens that all go to the native attention (decodes of a few
streams, a draft's verification) runs all decoder layers in `decode_layers` (layers/native/
decode_layers.c), which calls the kernels the Python path calls, in the same order: the same bits,
without ~100 us of Python, ctypes and torch per layer. Its linear layers read each weight once for
all the step's tokens. MKL's integer GEMM (_int_mm, on the Python path) does ~1.7x more multiplies
per second, so the plan wins only where a layer's Python costs more than that: for SmolLM2 (3.5 MB
of int8 weights a layer) up to ~6 tokens (4 tokens: 14.5 vs 22.5 ms a step), while for Qwen2.5-1.5B
(47 MB a layer) 5 tokens already ran slower than on the Python path (a draft's verification: 0.67
against 0.38 of a one-token step per extra token). Models with more than MULTI_ROW_MAX_LAYER_BYTES
a layer therefore use the plan for one token only. Where the C loop is the decode path anyway
(int_mm_is_faster() False: an AMD EPYC Zen 3 ran _int_mm at ~2 G multiply-adds/s; on an Intel Xeon
the AVX-512 VNNI tiles keep it within 1.5x), the plan takes up to MAX_PLAN_ROWS_C tokens: 16 streams
decoding offline ~1.3x faster on that EPYC (median of 3), 1.23x on that Xeon.
The plan holds the C structs (pointers to the weights, scratch buffers); it is made on the first
step it fits, after quantization.
"""

import ctypes

import torch

from tokenforge.model.layers.attention import native_attention_fits, native_kv_cache
from tokenforge.model.layers.native import DecodeLayer, DecodeModel, DecodeStep, decode_layers_kernel, layer_ops
from tokenforge.model.layers import quant_linear
from tokenforge.model.layers.quant_linear import Int8Linear

MAX_PLAN_ROWS = 6  # tokens a step may have to run in one call where _int_mm is faster (see the module docstring)
MAX_PLAN_ROWS_C = quant_linear.DECODE_ROWS  # where the C loop is the decode path anyway (int_mm_is_faster() False)
MULTI_ROW_MAX_LAYER_BYTES = 16 << 20  # int8 weights of a decoder layer up to which several tokens go in one call


class DecodePlan:
    def __init__(self, model, kernel):
        config = model.config
        self.kernel = kernel
        self.linears = [linear for layer in model.layers for linear in _linears(layer)]
        layer_bytes = sum(linear.weight.numel() for linear in self.linears) / len(model.layers)
        # Where the Python path would run the same C loop, with Python around it (w8a8-block layers always do):
        if not any(linear.INT_MM_PATH for linear in self.linears) or not quant_linear.int_mm_is_faster():
            self.max_rows = MAX_PLAN_ROWS_C
        else:
            self.max_rows = MAX_PLAN_ROWS if layer_bytes <= MULTI_ROW_MAX_LAYER_BYTES else 1  # tokens per call
        self.row_args = [linear._row_args for linear in self.linears]  # what the structs point into
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        hidden, inter, rows = config.hidden_size, config.intermediate_size, self.max_rows
        width = (config.num_heads + 2 * config.num_kv_heads) * config.head_dim
        self.scratch = [torch.empty(rows * n) for n in (hidden, width, config.num_heads * config.head_dim, hidden,
                                                        2 * inter, inter)]
        widest_input = max(hidden, config.num_heads * config.head_dim, inter)
        self.codes = torch.empty(2 * rows * widest_input, dtype=torch.int8)
        self.x_scales = torch.empty(rows)
        self.layers = (DecodeLayer * len(model.layers))(*[
            DecodeLayer(layer.input_layernorm.weight.data_ptr(), layer.post_attention_layernorm.weight.data_ptr(),
                        *[linear._row_args.address for linear in _linears(layer)])
            for layer in model.layers])
        attention = model.layers[0].self_attn
        self.model = DecodeModel(ctypes.addressof(self.layers), len(model.layers), hidden, config.num_heads,
                                 config.num_kv_heads, config.head_dim, inter, 0, model.layers[0].input_layernorm.eps,
                                 attention.scale, *[t.data_ptr() for t in self.scratch], self.codes.data_ptr(),
                                 self.x_scales.data_ptr(), rows)
        self.step = DecodeStep()
        self.step_address = ctypes.addressof(self.step)
        self.model_address = ctypes.addressof(self.model)

    @classmethod
    @torch.no_grad()
    def make(cls, model) -> "DecodePlan | None":
        """The plan, or None where the model does not fit it (then the Python path runs)."""
        kernel = decode_layers_kernel()
        config = model.config
        if (kernel is None or layer_ops() is None
                or not native_attention_fits(config.num_heads, config.num_kv_heads, config.head_dim)):
            return None
        norms = [norm for layer in model.layers for norm in (layer.input_layernorm, layer.post_attention_layernorm)]
        if len({norm.eps for norm in norms}) != 1 or any(
                norm.weight.dtype != torch.float32 or not norm.weight.is_contiguous() for norm in norms):
            return None  # the kernel takes one eps and fp32 norm weights
        for layer in model.layers:
            for linear in _linears(layer):
                if not isinstance(linear, Int8Linear) or not linear._row_fits(torch.zeros(1, linear.in_features)):
                    return None
        return cls(model, kernel)

    def __deepcopy__(self, memo):
        return None  # a copied model makes its own plan (its own weights)

    def is_current(self, model) -> bool:
        """Whether the model still has the layers (and their row arguments) the structs point into."""
        current = [linear for layer in model.layers for linear in _linears(layer)]
        return (len(current) == len(self.linears) and all(a is b for a, b in zip(current, self.linears))
                and all(linear._row_args is args for linear, args in zip(current, self.row_args)))

    def run(self, x: torch.Tensor, kv_caches: torch.Tensor, meta, rope) -> torch.Tensor:
        """x: [num_tokens, hidden] embedded tokens, updated in place to the residual stream before the
        last layer's MLP output; returns that output (the caller adds it and norms)."""
        cos, sin = rope
        tables = meta.native_block_tables
        threads = torch.get_num_threads()
        scores = torch.empty(threads * self.num_heads * meta.max_native_len)
        delta = torch.empty_like(x)
        self.model.block_size = kv_caches.shape[4]  # [num_layers, *kv_cache_shape(...)]
        step = self.step
        step.kv_caches, step.layer_stride = kv_caches.data_ptr(), kv_caches.stride(0)
        step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
        step.slots, step.tables = meta.slot_mapping.data_ptr(), tables.data_ptr()
        step.seq, step.lens = meta.native_token_seq.data_ptr(), meta.native_token_lens.data_ptr()
        step.table_width, step.scores, step.num_threads = tables.shape[1], scores.data_ptr(), threads
        step.kv_half = kv_caches.dtype == torch.float16
        step.num_rows, step.max_len = x.shape[0], meta.max_native_len
        for call in self.row_args:
            if call.args.num_threads != threads:
                call.args.num_threads = threads
        self.kernel(self.model_address, self.step_address, x.data_ptr(), delta.data_ptr(), 0)
        return delta


def _linears(layer) -> tuple:
    return layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj


def fits_step(x: torch.Tensor, kv_caches: torch.Tensor, meta) -> bool:
    """Up to MAX_PLAN_ROWS_C tokens (the plan's max_rows decides), all of them for the native
    attention, fp32 on the CPU, no autograd, a cache the native kernels take."""
    return (x.shape[0] <= MAX_PLAN_ROWS_C and meta.num_native_tokens == x.shape[0] and x.dtype == torch.float32
            and x.is_cpu and native_kv_cache(kv_caches) and not torch.is_grad_enabled())
