"""Builders for integration tests: engines over the shared weights."""

from tokenforge.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from tokenforge.engine.engine_core import EngineCore
from tokenforge.engine.llm import LLM

TEST_KV_BYTES = 256 << 20


def make_engine_core(loaded, *, num_blocks: int | None = None, block_size: int = 16, prefix_caching: bool = True,
                     max_num_batched_tokens: int = 2048, max_num_seqs: int = 128,
                     max_num_waiting: int = 1024, speculative: SpeculativeConfig | None = None,
                     draft=None, cache_dtype: str = CacheConfig.cache_dtype) -> EngineCore:
    """`draft`: a LoadedModel for speculative method "draft"."""
    model, dtype, device = loaded
    cache = CacheConfig(block_size=block_size, kv_cache_memory_bytes=TEST_KV_BYTES,
                        num_blocks_override=num_blocks, enable_prefix_caching=prefix_caching, cache_dtype=cache_dtype)
    scheduler = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_num_waiting=max_num_waiting)
    config = EngineConfig(cache=cache, scheduler=scheduler, speculative=speculative or SpeculativeConfig())
    return EngineCore(config, model, dtype, device, draft=draft)


def make_llm(loaded, **options) -> LLM:
    return LLM(engine=make_engine_core(loaded, **options))


def make_word_tokenizer(vocab_size: int, directory) -> None:
    """Saves a word-level tokenizer of exactly `vocab_size` ids ("<unk>", "<s>", "</s>", "w3", ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(str(directory))


def permute_rope_for_gguf(weight, num_heads: int):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute: q/k rows into the GGUF rotary layout."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def make_gguf(path, hf_model, quantized_names: frozenset[str] = frozenset()) -> dict:
    """Writes a transformers Llama/Mistral/Qwen2 model as llama.cpp's converter would.

    Tensors are F32, except the HF names in `quantized_names`, which are written as Q8_0. Llama 3.1
    rope scaling becomes the `rope_freqs` tensor of per-frequency divisors, as llama.cpp stores it.
    Returns {HF name: the values the file holds, in HF layout} for building a reference.
    """
    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize, quantize

    config = hf_model.config
    arch = "qwen2" if config.model_type == "qwen2" else "llama"  # llama.cpp writes Mistral as llama
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    # transformers 5 holds rope_theta and the scaling in rope_parameters; 4 in two attributes.
    rope = getattr(config, "rope_parameters", None)
    rope = dict(rope or {**(config.rope_scaling or {}), "rope_theta": config.rope_theta})
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    # A byte-level BPE tokenizer of the same words as make_word_tokenizer (no merges: one token a word).
    tokens = ["<unk>", "<s>", "</s>", *(f"w{i}" for i in range(3, config.vocab_size))]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_factors(rope, head_dim, rope["rope_theta"]))
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2 if arch == "qwen2" else gguf.MODEL_ARCH.LLAMA,
                                        config.num_hidden_layers)
    held = {}
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy()
        qtype = gguf.GGMLQuantizationType.Q8_0 if name in quantized_names else None
        if qtype is not None:
            data = quantize(data, qtype)  # uint8 [rows, cols // 32 * 34]
        held[name] = torch.from_numpy(dequantize(data, qtype) if qtype is not None else data.copy())
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            # Q8_0 blocks run along a row, so permuting rows after quantizing equals doing it before.
            data = permute_rope_for_gguf(data, heads if "q_proj" in name else kv_heads)
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, np.ascontiguousarray(data), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def _llama3_rope_factors(rope: dict, head_dim: int, theta: float):
    """convert_hf_to_gguf.py's LlamaModel rope factors: inv_freq is divided by these."""
    import math

    import numpy as np

    factor, old_len = rope["factor"], rope["original_max_position_embeddings"]
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old_len / high:
            factors.append(1.0)
        elif wavelen > old_len / low:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
