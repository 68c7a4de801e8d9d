"""`tokenforge serve --config FILE.toml`: models from the file, command-line defaults, and the errors."""

import pytest

from tokenforge.cli.main import build_parser, main
from tokenforge.cli.serve_config import serve_config_from_args
from tokenforge.config import SchedulerConfig
from tokenforge.errors import ConfigError

VALID = """
host = "0.0.0.0"
port = 9000
dtype = "float32"

[[models]]
model = "smollm2-135m-instruct"
served_name = "smollm2"
kv_cache_memory = "1GiB"
max_num_seqs = 64

[[models]]
model = "/models/qwen.gguf"
no_prefix_caching = true
"""


def make_config(tmp_path, text: str, *flags: str):
    path = tmp_path / "serve.toml"
    path.write_text(text)
    return serve_config_from_args(build_parser().parse_args(["serve", "--config", str(path), *flags]))


def test_valid_file(tmp_path):
    config = make_config(tmp_path, VALID)
    assert (config.host, config.port, config.log_level) == ("0.0.0.0", 9000, "info")
    first, second = config.models
    assert (first.served_name, first.engine.model.model) == ("smollm2", "smollm2-135m-instruct")
    assert first.engine.cache.kv_cache_memory_bytes == 1 << 30 and first.engine.scheduler.max_num_seqs == 64
    assert first.engine.cache.enable_prefix_caching and not second.engine.cache.enable_prefix_caching
    # No served_name: the model value. Top-level engine options apply to every model.
    assert second.served_name == "/models/qwen.gguf"
    assert first.engine.model.dtype == second.engine.model.dtype == "float32"


def test_command_line_options_are_the_defaults(tmp_path):
    config = make_config(tmp_path, VALID, "--max-num-seqs", "8", "--max-num-waiting", "3", "--port", "1234",
                         "--log-level", "debug")
    first, second = config.models
    assert first.engine.scheduler.max_num_seqs == 64  # the file's table wins
    assert second.engine.scheduler.max_num_seqs == 8  # the command line fills in
    assert first.engine.scheduler.max_num_waiting == second.engine.scheduler.max_num_waiting == 3
    assert config.port == 9000 and config.log_level == "debug"
    assert second.engine.scheduler.max_num_batched_tokens == SchedulerConfig.max_num_batched_tokens


def test_file_without_models_uses_the_flags(tmp_path):
    config = make_config(tmp_path, 'port = 8100\nmax_num_seqs = 2\n', "--model", "m1", "--model", "m2")
    assert [m.served_name for m in config.models] == ["m1", "m2"] and config.port == 8100
    assert all(m.engine.scheduler.max_num_seqs == 2 for m in config.models)


def test_quantization_keys(tmp_path):
    text = ('quantization = "w8a8"\n[[models]]\nmodel = "x"\nspeculative_method = "draft"\ndraft_model = "y"\n'
            'draft_quantization = "int8"\ndraft_head_ids = 65536\n')
    (model,) = make_config(tmp_path, text).models
    assert model.engine.model.quantization == "w8a8"
    spec = model.engine.speculative
    assert (spec.draft_model, spec.draft_quantization, spec.draft_head_ids) == ("y", "int8", 65536)


def test_kv_cache_dtype_key_and_flag(tmp_path):
    (model,) = make_config(tmp_path, '[[models]]\nmodel = "x"\nkv_cache_dtype = "float32"\n').models
    assert model.engine.cache.cache_dtype == "float32"
    args = build_parser().parse_args(["serve", "--model", "m", "--kv-cache-dtype", "float16"])
    assert serve_config_from_args(args).models[0].engine.cache.cache_dtype == "float16"
    assert make_config(tmp_path, '[[models]]\nmodel = "x"\n').models[0].engine.cache.cache_dtype == "auto"


def test_duplicate_served_names(tmp_path):
    text = '[[models]]\nmodel = "x"\nserved_name = "a"\n[[models]]\nmodel = "y"\nserved_name = "a"\n'
    with pytest.raises(ConfigError, match="two models are served as 'a'"):
        make_config(tmp_path, text)
    with pytest.raises(ConfigError, match="two models are served as 'm'"):
        serve_config_from_args(build_parser().parse_args(["serve", "--model", "m", "--model", "m"]))


@pytest.mark.parametrize("text, message", [
    ('[[models]]\nmodel = "x"\nmax_seqs = 4\n', r"models\[0\]: unknown key 'max_seqs'"),
    ('prot = 8000\n', "unknown key 'prot'"),
    ('model = "x"\n', "unknown key 'model'"),  # a model needs its [[models]] table
    ('[[models]]\nserved_name = "a"\n', r"models\[0\] has no 'model' key"),
    ('[[models]]\nmodel = "x"\nmax_num_seqs = "64"\n', "max_num_seqs must be an integer"),
    ('[[models]]\nmodel = "x"\nkv_cache_memory = "lots"\n', "kv_cache_memory is not a size"),
    ('port = [1\n', "not valid TOML"),
    ('quantization = "int3"\n', "quantization must be one of auto, none, int8, w8a8, w8a8-block, int4"),
    ('draft_quantization = 8\n', "draft_quantization must be a string"),
    ('draft_head_ids = -1\n', "draft_head_ids must be a whole number >= 0"),
    ('kv_cache_dtype = "int8"\n', "kv_cache_dtype must be one of auto, float32, float16, bfloat16"),
    ('[[models]]\nmodel = "x"\nspeculative_method = "hybrid"\n', "speculative-method hybrid needs --draft-model"),
    ('[[models]]\nmodel = "x"\nspeculative_method = "ngram"\ndraft_model = "y"\n', "only used with"),
])
def test_bad_files(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, text)


def test_models_in_both_places(tmp_path):
    with pytest.raises(ConfigError, match="not both"):
        make_config(tmp_path, VALID, "--model", "other")


def test_served_names_must_pair_with_models():
    args = build_parser().parse_args(["serve", "--model", "a", "--model", "b", "--served-model-name", "x"])
    with pytest.raises(ConfigError, match="one per --model"):
        serve_config_from_args(args)


def test_cli_reports_one_line_and_exits_1(tmp_path, capsys):
    path = tmp_path / "serve.toml"
    path.write_text('[[models]]\nmodel = "x"\nserved_name = "a"\n[[models]]\nmodel = "y"\nserved_name = "a"\n')
    assert main(["serve", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tokenforge serve: error: two models are served as 'a'")
    assert main(["serve", "--config", str(tmp_path / "missing.toml")]) == 1
    assert "cannot read config file" in capsys.readouterr().err
