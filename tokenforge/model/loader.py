"""Loads a model and its tokenizer from a GGUF file or a Hugging Face safetensors directory.

Parameters are allocated once in their final dtype and filled tensor by tensor, so peak memory is
the model plus one dequantized tensor. With a quantization (int8 layers on the CPU), each linear
layer's weight is allocated when its first tensor arrives and quantized as soon as it is whole, so
the full-precision model never exists at once (peak: the int8 model plus one layer).
`load_format="dummy"` fills them with random values instead.
"""

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenforge.errors import ModelFileError
from tokenforge.model import gguf_file, weights
from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.layers.rotary import RotaryEmbedding
from tokenforge.model.registry import get_model_class

logger = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: nn.Module
    arch_config: ArchConfig
    tokenizer: object | None  # a transformers tokenizer; None for shape-only dummy models
    path: Path | None
    num_params: int = 0  # of the weights as loaded (before any quantization): what pricing buckets by
    quantized_source: bool = False  # the checkpoint stores quantized blocks (a Q4_0 ... Q8_0 or K-quant GGUF)

    def __post_init__(self):
        if not self.num_params and self.model is not None:
            self.num_params = sum(p.numel() for p in self.model.parameters())


def build_model(arch_config: ArchConfig, dtype: torch.dtype, device: torch.device,
                lazy_linears: bool = False) -> nn.Module:
    """The module tree with uninitialised parameters of `dtype` on `device` (no init pass); with
    lazy_linears, nn.Linear parameters stay on the meta device until load_weights fills them."""
    with torch.device("meta"):
        model = get_model_class(arch_config.architecture)(arch_config)
    # Cast on the meta device (free), then allocate once: no transient fp32 copy for bf16.
    model = model.to(dtype)
    for module in model.modules():
        if not (lazy_linears and isinstance(module, nn.Linear)):
            _to_empty(module, device)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.build(device)
    return model.eval()


def _to_empty(module: nn.Module, device: torch.device) -> None:
    """module.to_empty(device=device, recurse=False) with torch.empty: to_empty's empty_like of a meta
    tensor imports sympy and torch.fx (~25 MiB resident) to work out a memory format."""
    for name, param in module.named_parameters(recurse=False):
        setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device),
                                           requires_grad=param.requires_grad))
    for name, buffer in module.named_buffers(recurse=False):
        setattr(module, name, torch.empty(buffer.shape, dtype=buffer.dtype, device=device))


def load_weights(model: nn.Module, tensors, flavor: str, permute_qk: bool,
                 on_linear_filled: Callable[[str, nn.Linear], nn.Module] | None = None,
                 device: torch.device | None = None) -> None:
    """Copies (name, tensor) pairs into the model's parameters; every parameter must be filled.
    A parameter still on the meta device is allocated on `device` when its first tensor arrives;
    a linear layer whose parameters are all filled is replaced by on_linear_filled(name, layer) if given."""
    config: ArchConfig = model.config
    params = dict(model.named_parameters())
    expected = {name: param.numel() for name, param in params.items()}
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    filled: dict[str, int] = {}
    for name, tensor in tensors:
        mapped = weights.map_name(name, flavor)
        if mapped is None:
            logger.debug("skipping checkpoint tensor %s", name)
            continue
        param_name, part = mapped
        if param_name not in params:
            continue  # e.g. lm_head.weight of a model whose head is tied
        if permute_qk and part in ("q", "k"):
            tensor = weights.unpermute_rope(tensor, config.num_heads if part == "q" else config.num_kv_heads)
        param = params[param_name]
        if param.is_meta:
            param = params[param_name] = _allocate(model, param_name, param, device)
        rows = weights.shard_rows(part, q_size, kv_size, config.intermediate_size)
        target = param.data if rows is None else param.data[rows]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ModelFileError(f"tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        target.copy_(tensor)
        filled[param_name] = filled.get(param_name, 0) + tensor.numel()
        if on_linear_filled is not None and filled[param_name] == expected[param_name]:
            _replace_if_whole(model, param_name, params, filled, expected, on_linear_filled)
    missing = [n for n, count in expected.items() if filled.get(n, 0) != count]
    if missing:
        raise ModelFileError(f"checkpoint lacks weights for: {', '.join(missing[:5])}")


def _allocate(model: nn.Module, param_name: str, param: nn.Parameter, device: torch.device | None) -> nn.Parameter:
    owner_name, _, attr = param_name.rpartition(".")
    allocated = nn.Parameter(torch.empty(param.shape, dtype=param.dtype, device=device), requires_grad=False)
    setattr(model.get_submodule(owner_name), attr, allocated)
    return allocated


def _replace_if_whole(model: nn.Module, param_name: str, params: dict, filled: dict, expected: dict,
                      replace: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replaces the linear layer owning param_name once all its parameters are filled, and drops
    the references to its full-precision parameters so that their memory goes."""
    owner_name = param_name.rpartition(".")[0]
    owner = model.get_submodule(owner_name)
    names = [f"{owner_name}.{attr}" for attr, _ in owner.named_parameters()]
    if not isinstance(owner, nn.Linear) or any(filled.get(n, 0) != expected[n] for n in names):
        return
    parent_name, _, child = owner_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replace(owner_name, owner))
    for name in names:
        del params[name]


def init_dummy_weights(model: nn.Module, seed: int) -> None:
    """Random weights of the right shapes and a sane scale, for speed tests without a checkpoint."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.data.fill_(1.0)
            continue
        values = torch.empty(param.shape, dtype=torch.float32).uniform_(-0.02, 0.02, generator=generator)
        param.data.copy_(values)


def load_model(path: Path | None, dtype: torch.dtype, device: torch.device, *,
               dummy_config: dict | None = None, load_format: str = "auto", seed: int = 0,
               cache_dir: Path | None = None,
               quantize_linear: Callable[[bool], Callable[[str, nn.Linear], nn.Module] | None] | None = None,
               ) -> LoadedModel:
    """quantize_linear(quantized_source) may give the function that replaces each linear layer of a
    GGUF model as it is loaded (None: keep them); the caller quantizes other models afterwards."""
    if path is None:
        assert dummy_config is not None
        arch_config = ArchConfig.from_hf_config(dummy_config)
        model = build_model(arch_config, dtype, device)
        init_dummy_weights(model, seed)
        return LoadedModel(model, arch_config, None, None)
    if path.is_dir():
        return _load_hf_dir(path, dtype, device, load_format, seed)
    config, entries = gguf_file.read_index(path, cache_dir)
    arch_config = ArchConfig.from_hf_config(config)
    quantized_source = gguf_file.is_quantized(entries)
    replace = None if quantize_linear is None or load_format == "dummy" else quantize_linear(quantized_source)
    model = build_model(arch_config, dtype, device, lazy_linears=replace is not None)
    num_params = sum(p.numel() for p in model.parameters())  # as loaded, before any quantization
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        permute = arch_config.architecture in ("llama", "mistral")
        with torch.no_grad():
            load_weights(model, gguf_file.iter_entries(entries, path), "gguf", permute_qk=permute,
                         on_linear_filled=replace, device=device)
    tokenizer = gguf_file.load_tokenizer(path, cache_dir)
    return LoadedModel(model, arch_config, tokenizer, path, num_params=num_params, quantized_source=quantized_source)


def _load_hf_dir(path: Path, dtype, device, load_format: str, seed: int) -> LoadedModel:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelFileError(f"{config_file} is missing: not a Hugging Face model directory")
    arch_config = ArchConfig.from_hf_config(json.loads(config_file.read_text()))
    model = build_model(arch_config, dtype, device)
    files = sorted(path.glob("*.safetensors"))
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif not files:
        raise ModelFileError(f"no *.safetensors files in {path}")
    else:
        def tensors():
            for file in files:
                with safe_open(str(file), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)

        with torch.no_grad():
            load_weights(model, tensors(), "hf", permute_qk=False)
    return LoadedModel(model, arch_config, AutoTokenizer.from_pretrained(str(path)), path)
