"""`tokenforge serve` parses its options without loading anything."""

from tokenforge.cli.main import build_parser
from tokenforge.cli.serve_config import serve_config_from_args


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.served_model_name, args.config) == ("127.0.0.1", 8000, None,
                                                                                       None, None)
    config = serve_config_from_args(args)
    assert [(m.served_name, m.engine.model.model) for m in config.models] == [("smollm2-135m-instruct",) * 2]


def test_serve_options():
    args = build_parser().parse_args(["serve", "--port", "9000", "--kv-cache-memory", "2GiB", "--max-num-waiting", "4",
                                      "--served-model-name", "tiny", "--max-model-len", "1024", "--log-level", "debug"])
    assert args.kv_cache_memory == 2 << 30 and args.max_num_waiting == 4 and args.served_model_name == ["tiny"]
    assert args.max_model_len == 1024 and args.port == 9000
    (model,) = serve_config_from_args(args).models
    assert model.served_name == "tiny" and model.engine.scheduler.max_num_waiting == 4


def test_serve_repeated_model():
    args = build_parser().parse_args(["serve", "--model", "a.gguf", "--model", "b", "--served-model-name", "x",
                                      "--served-model-name", "y"])
    config = serve_config_from_args(args)
    assert [(m.served_name, m.engine.model.model) for m in config.models] == [("x", "a.gguf"), ("y", "b")]
