"""Every architecture we claim, against transformers, on tiny random-weight models (no downloads).

Each model is built by transformers from a fixed seed and saved as safetensors (or written as a GGUF
the way llama.cpp's converter writes one), then loaded through our loader. Prompt logits at every
position must match transformers' forward pass, and greedy tokens its own greedy decoding.
"""

from pathlib import Path

import pytest
import torch

from tests.integration.helpers import make_engine_core, make_gguf, make_word_tokenizer
from tokenforge.engine.llm import LLM
from tokenforge.engine.request import Request
from tokenforge.errors import ModelFileError
from tokenforge.model import catalog, loader
from tokenforge.model.arch_config import ArchConfig
from tokenforge.model.registry import get_model_class
from tokenforge.sampling_params import SamplingParams

VOCAB_SIZE = 384
MAX_LOGIT_DIFF = 1e-4  # fp32, same weights (seen: about 1e-6)
BF16_MAX_LOGIT_DIFF = 0.15  # bf16 against fp32 logits of up to ~4 (seen: about 0.05)
NUM_NEW_TOKENS = 16
EXACT_CACHE = "float32"  # the default CPU cache holds fp16: these tests compare the maths at fp32
NUM_BLOCKS = 64  # of 16 tokens: room for every prompt of a test at once
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=VOCAB_SIZE, bos_token_id=1, eos_token_id=2, initializer_range=0.1)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
# name -> (transformers model type, config keywords beyond SMALL)
ARCHS = {
    "llama": ("llama", dict(num_key_value_heads=4)),
    # With original_max_position_embeddings 64, every frequency but the fastest is scaled.
    "llama3.1": ("llama", dict(num_key_value_heads=2, max_position_embeddings=512, rope_theta=500000.0,
                               rope_scaling=LLAMA3_ROPE)),
    # head_dim 32 with hidden 64 and 4 heads: q/o are not square (as in Mistral Nemo).
    "mistral": ("mistral", dict(num_key_value_heads=2, head_dim=32, sliding_window=None)),
    "qwen2": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama_gqa": ("llama", dict(num_key_value_heads=1, tie_word_embeddings=False)),
}
# Token-id prompts of several lengths: one token (a decode-shaped step), within a block, across
# blocks, and past position 64 where Llama 3.1 scaling's original context ends.
PROMPT_LENGTHS = (1, 7, 33, 90)


def make_hf_model(name: str):
    """The transformers model of ARCHS[name], its weights drawn from a fixed seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = ARCHS[name]
    config = AutoConfig.for_model(model_type, **{**SMALL, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float().eval()


def make_checkpoint(directory: Path, hf_model) -> Path:
    hf_model.save_pretrained(str(directory), safe_serialization=True)
    make_word_tokenizer(hf_model.config.vocab_size, directory)
    return directory


def make_prompts(lengths=PROMPT_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB_SIZE, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module", params=list(ARCHS))
def tiny(request, tmp_path_factory):
    """(name, transformers model, checkpoint directory) of one architecture."""
    hf_model = make_hf_model(request.param)
    return request.param, hf_model, make_checkpoint(tmp_path_factory.mktemp(request.param), hf_model)


def load(path: Path, dtype=torch.float32, **kwargs):
    return loader.load_model(path, dtype, torch.device("cpu"), **kwargs), dtype, torch.device("cpu")


def engine_prompt_logits(loaded, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Our logits at every prompt position, all prompts in one engine step: [len(prompt), vocab] each."""
    engine = make_engine_core(loaded, num_blocks=NUM_BLOCKS, prefix_caching=False, cache_dtype=EXACT_CACHE)
    for index, token_ids in enumerate(prompts):
        engine.scheduler.add_request(Request(f"logits-{index}", token_ids, SamplingParams(max_tokens=1)))
    scheduled = engine.scheduler.schedule()
    assert sum(scheduled.num_scheduled_tokens.values()) == sum(map(len, prompts)), "not one step"
    batch = engine.runner.prepare(scheduled)
    with torch.inference_mode():
        hidden = engine.runner.model(batch.input_ids, batch.positions, engine.runner.kv_caches, batch.meta)
        logits = engine.runner.model.compute_logits(hidden).float()
    by_id, start = {}, 0
    for request in scheduled.scheduled_requests:  # prefills keep their order: one prompt after another
        by_id[request.request_id] = logits[start : start + request.num_prompt_tokens]
        start += request.num_prompt_tokens
    return [by_id[f"logits-{index}"] for index in range(len(prompts))]


def hf_prompt_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(input_ids=torch.tensor([token_ids])).logits[0].float()


def hf_greedy(hf_model, token_ids: list[int], num_new: int) -> list[int]:
    """Greedy decoding by transformers, a full forward pass per token (the same in every version)."""
    tokens = list(token_ids)
    for _ in range(num_new):
        tokens.append(int(hf_prompt_logits(hf_model, tokens)[-1].argmax()))
    return tokens[len(token_ids):]


def assert_logits_close(ours: list[torch.Tensor], theirs: list[torch.Tensor], tolerance: float) -> None:
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, f"prompt {index}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        diff = float((a - b).abs().max())
        assert diff < tolerance, f"prompt {index} ({len(a)} tokens): max |logit diff| {diff:.2e}"


GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)


def test_config_read_as_transformers_writes_it(tiny):
    name, hf_model, path = tiny
    arch = load(path)[0].arch_config
    hf = hf_model.config
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim) == (hf.num_attention_heads, hf.num_key_value_heads,
                                                                  head_dim)
    assert arch.tie_word_embeddings == hf.tie_word_embeddings
    assert arch.attention_bias == (name == "qwen2")
    # transformers 5 writes rope_theta and the scaling inside "rope_parameters", 4 as top-level keys.
    overrides = ARCHS[name][1]
    assert arch.rope_theta == overrides.get("rope_theta", 10000.0)
    assert (arch.rope_scaling or {}).get("rope_type") == overrides.get("rope_scaling", {}).get("rope_type")


def test_prompt_logits_match_hf(tiny):
    _, hf_model, path = tiny
    prompts = make_prompts()
    ours = engine_prompt_logits(load(path), prompts)
    assert_logits_close(ours, [hf_prompt_logits(hf_model, p) for p in prompts], MAX_LOGIT_DIFF)


def test_greedy_matches_hf(tiny):
    _, hf_model, path = tiny
    prompts = make_prompts((3, 20, 80), seed=1)
    engine = make_engine_core(load(path), num_blocks=NUM_BLOCKS, prefix_caching=False, cache_dtype=EXACT_CACHE)
    llm = LLM(engine=engine)
    outputs = llm.generate(prompts, GREEDY)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, NUM_NEW_TOKENS)


def test_bf16_runs_close_to_fp32(tmp_path):
    hf_model = make_hf_model("llama3.1")
    path = make_checkpoint(tmp_path, hf_model)
    loaded = load(path, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded[0].model.parameters())
    prompts = make_prompts()
    assert_logits_close(engine_prompt_logits(loaded, prompts), [hf_prompt_logits(hf_model, p) for p in prompts],
                        BF16_MAX_LOGIT_DIFF)
    llm = LLM(engine=make_engine_core(loaded, num_blocks=NUM_BLOCKS, cache_dtype=EXACT_CACHE))
    for output in llm.generate(prompts, GREEDY):
        token_ids = output.outputs[0].token_ids
        assert len(token_ids) == NUM_NEW_TOKENS and all(0 <= t < VOCAB_SIZE for t in token_ids)


def test_dummy_load_format_reads_no_weights(tmp_path):
    hf_model = make_hf_model("llama_gqa")
    hf_model.config.save_pretrained(str(tmp_path))
    make_word_tokenizer(VOCAB_SIZE, tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))
    loaded = load(tmp_path, load_format="dummy")
    engine = make_engine_core(loaded, num_blocks=NUM_BLOCKS, cache_dtype=EXACT_CACHE)
    outputs = LLM(engine=engine).generate(make_prompts(), GREEDY)
    for output in outputs:
        token_ids = output.outputs[0].token_ids
        assert len(token_ids) == NUM_NEW_TOKENS and all(0 <= t < VOCAB_SIZE for t in token_ids)
    # The shapes are the checkpoint's: transformers' own weights fill every parameter exactly.
    with torch.no_grad():
        loader.load_weights(loaded[0].model, hf_model.state_dict().items(), "hf", permute_qk=False)


@pytest.mark.parametrize("name, num_params", [
    ("llama-3.1-8b", 8_030_261_248), ("llama-3.2-1b", 1_235_814_400), ("qwen2.5-7b", 7_615_616_512),
])
def test_shape_catalog_num_params(name, num_params):
    arch = ArchConfig.from_hf_config(catalog.shape_config(name))
    assert arch.num_params == pytest.approx(num_params, rel=0.01)
    with torch.device("meta"):
        model = get_model_class(arch.architecture)(arch)
    assert arch.num_params == sum(p.numel() for p in model.parameters())


def test_sliding_window_caps_the_context():
    # Mistral 7B v0.1 attends to the last 4096 tokens only; we attend to all, so stop at 4096.
    config = {**SMALL, "model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 4096}
    assert ArchConfig.from_hf_config(config).max_position_embeddings == 4096
    # Qwen2 configs carry a window that is off unless use_sliding_window is set.
    qwen2 = {**config, "model_type": "qwen2", "use_sliding_window": False}
    assert ArchConfig.from_hf_config(qwen2).max_position_embeddings == 32768


@pytest.mark.parametrize("rope", [{"rope_type": "yarn", "factor": 4.0}, {"type": "dynamic", "factor": 2.0}])
def test_unsupported_rope_scaling_is_refused(rope):
    with pytest.raises(ModelFileError, match="rope"):
        ArchConfig.from_hf_config({**SMALL, "model_type": "llama", "rope_scaling": rope})


def load_gguf(path: Path):
    loaded = load(path, cache_dir=path.parent / "cache")
    assert loaded[0].tokenizer.eos_token_id == 2 and loaded[0].tokenizer.decode([5, 6]) == "w5w6"
    return loaded


@pytest.mark.parametrize("name", ["llama3.1", "qwen2", "mistral"])
def test_gguf_matches_hf(name, tmp_path):
    hf_model = make_hf_model(name)
    make_gguf(tmp_path / "tiny.gguf", hf_model)
    loaded = load_gguf(tmp_path / "tiny.gguf")
    from_dir = ArchConfig.from_hf_config(hf_model.config.to_dict())
    for field in ("num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias", "rope_theta"):
        assert getattr(loaded[0].arch_config, field) == getattr(from_dir, field), field
    prompts = make_prompts()
    assert_logits_close(engine_prompt_logits(loaded, prompts), [hf_prompt_logits(hf_model, p) for p in prompts],
                        MAX_LOGIT_DIFF)


def test_gguf_q8_0_matches_dequantized_values(tmp_path):
    hf_model = make_hf_model("llama_gqa")
    quantized = frozenset(n for n, t in hf_model.state_dict().items() if t.dim() == 2)
    held = make_gguf(tmp_path / "tiny.gguf", hf_model, quantized)
    loaded = load_gguf(tmp_path / "tiny.gguf")
    weight = hf_model.state_dict()["model.layers.0.mlp.down_proj.weight"]
    assert 0 < float((held["model.layers.0.mlp.down_proj.weight"] - weight).abs().max()) < 1e-2
    hf_model.load_state_dict(held, strict=False)  # the reference now holds what the file holds
    prompts = make_prompts()
    assert_logits_close(engine_prompt_logits(loaded, prompts), [hf_prompt_logits(hf_model, p) for p in prompts],
                        MAX_LOGIT_DIFF)
