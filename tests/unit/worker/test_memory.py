"""The KV cache's element type: fp16 by default only where the native attention reads it."""

import pytest
import torch

from tokenforge.errors import ConfigError
from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.layers.native import layer_ops
from tokenforge.worker.memory import pick_cache_dtype

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def make_arch(hidden_size: int = 64, num_heads: int = 4, num_kv_heads: int = 2) -> ArchConfig:
    return ArchConfig.from_hf_config({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden_size,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads, "vocab_size": 16, "max_position_embeddings": 64, "rms_norm_eps": 1e-5,
    })


@pytest.mark.skipif(layer_ops() is None, reason="no native kernels (needs x86-64 with AVX2 and cc)")
def test_auto_is_fp16_under_fp32_on_the_cpu_where_the_native_attention_runs():
    assert pick_cache_dtype("auto", make_arch(), torch.float32, CPU) == torch.float16
    assert pick_cache_dtype("auto", make_arch(hidden_size=36), torch.float32, CPU) == torch.float32  # head_dim 9
    assert pick_cache_dtype("auto", make_arch(num_heads=32, num_kv_heads=1, hidden_size=256), torch.float32,
                            CPU) == torch.float32  # 32 query heads per KV head: more than the kernel takes


def test_auto_is_the_models_dtype_elsewhere_and_names_are_checked():
    assert pick_cache_dtype("auto", make_arch(), torch.bfloat16, CUDA) == torch.bfloat16
    assert pick_cache_dtype("auto", make_arch(), torch.bfloat16, CPU) == torch.bfloat16
    assert pick_cache_dtype("float32", make_arch(), torch.float32, CPU) == torch.float32
    assert pick_cache_dtype("float16", make_arch(), torch.bfloat16, CUDA) == torch.float16
    with pytest.raises(ConfigError, match="unknown KV cache dtype"):
        pick_cache_dtype("int4", make_arch(), torch.float32, CPU)
