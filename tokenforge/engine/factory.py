"""Builds an EngineCore from an EngineConfig: resolve the model, pick device and dtype, load."""

import dataclasses
import logging
import time
from pathlib import Path

import torch

from tokenforge.config import EngineConfig, ModelConfig, SpeculativeConfig, default_cache_dir
from tokenforge.engine.engine_core import EngineCore
from tokenforge.errors import ConfigError, InvalidRequestError
from tokenforge.model.catalog import shape_config
from tokenforge.model.layers.native import int8_kernels
from tokenforge.model.layers.quantize import linear_quantizer, quantize_model
from tokenforge.model.loader import LoadedModel, load_model
from tokenforge.model.pull import resolve_model
from tokenforge.worker.memory import loading_memory

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' was asked for but no CUDA device is available")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU (no bf16 matmul hardware on common x86 servers), bf16 on GPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidRequestError(f"unknown dtype {name!r} (choose from {', '.join(_DTYPES)})") from None


def pick_quantization(name: str, device: torch.device, quantized_source: bool) -> str:
    """auto: on the CPU when the checkpoint is quantized already (its fp32 copy is no more exact than
    8-bit weights, which read a quarter of the bytes), w8a8-block where the native kernels run (8-bit
    products at about twice the rate of int8's 16-bit ones on AVX2 and on AVX-512 VNNI's vpdpbusd; a
    quality within 1% of fp32 like int8's, docs/benchmarks.md), int8 elsewhere; none otherwise.
    int8, w8a8, w8a8-block and int4 run on the CPU only; w8a8-block and int4 need the native kernels."""
    if name == "auto":
        if device.type != "cpu" or not quantized_source:
            return "none"
        return "w8a8-block" if int8_kernels() is not None else "int8"
    if name != "none" and device.type != "cpu":
        raise ConfigError(f"--quantization {name} runs on the CPU only (the device is {device})")
    if name in ("int4", "w8a8-block") and int8_kernels() is None:
        raise ConfigError(f"--quantization {name} needs the native kernels (x86-64 with AVX2, F16C and FMA, a C "
                          "compiler, TOKENFORGE_NATIVE_KERNELS not 0)")
    return name


def pick_draft_quantization(name: str, device: torch.device) -> str:
    """auto: on the CPU w8a8-block where the native kernels run (as fast a draft as w8a8 on AVX2; on
    an AMD Zen 4 with AVX-512 VNNI, whose w8a8 tiles are slow for one row, a Qwen 0.5B draft step
    0.88 -> 0.53 of the 1.5B target's), else w8a8 (about 2/3 of int8's time); a draft's precision
    moves only how often its tokens are accepted, never the output. None elsewhere."""
    if name == "auto":
        if device.type != "cpu":
            return "none"
        return "w8a8-block" if int8_kernels() is not None else "w8a8"
    return name


def load_draft(target: ModelConfig, speculative: SpeculativeConfig) -> LoadedModel:
    """The draft model: the target's device, dtype and cache (its K/V live beside the target's), its
    own quantization."""
    quantization = pick_draft_quantization(speculative.draft_quantization, pick_device(target.device))
    return load(dataclasses.replace(target, model=speculative.draft_model, quantization=quantization))[0]


def load(mc: ModelConfig) -> tuple[LoadedModel, torch.dtype, torch.device]:
    """Resolves (pulling if needed) and loads the model a ModelConfig names."""
    device = pick_device(mc.device)
    dtype = pick_dtype(mc.dtype, device)
    cache_dir = Path(mc.cache_dir) if mc.cache_dir else default_cache_dir()
    started = time.monotonic()
    dummy_config = shape_config(mc.model) if mc.load_format == "dummy" else None
    path = None if dummy_config is not None else resolve_model(mc.model, cache_dir)

    def quantize_linear(quantized_source: bool):  # GGUF layers are quantized as they load: a lower peak
        method = pick_quantization(mc.quantization, device, quantized_source)
        return None if method == "none" else linear_quantizer(method)

    with loading_memory():
        loaded = load_model(path, dtype, device, dummy_config=dummy_config, load_format=mc.load_format,
                            seed=mc.seed, cache_dir=cache_dir, quantize_linear=quantize_linear)
        quantization = pick_quantization(mc.quantization, device, loaded.quantized_source)
        if quantization != "none":
            with torch.no_grad():
                quantize_model(loaded.model, quantization)
    logger.info("loaded %s (%s, %.0fM parameters, %s%s on %s) in %.1f s", mc.model, loaded.arch_config.architecture,
                loaded.num_params / 1e6, dtype, "" if quantization == "none" else f", {quantization} linear layers",
                device, time.monotonic() - started)
    return loaded, dtype, device


def build_engine_core(config: EngineConfig) -> EngineCore:
    loaded, dtype, device = load(config.model)
    draft = None
    if config.speculative.enabled and config.speculative.uses_draft_model:
        if config.speculative.draft_model is None:
            raise ConfigError(f"speculative method {config.speculative.method!r} needs a draft model (--draft-model)")
        draft = load_draft(config.model, config.speculative)
    return EngineCore(config, loaded, dtype, device, draft=draft)
