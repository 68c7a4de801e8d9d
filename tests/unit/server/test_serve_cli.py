"""`tokenforge serve` parses its options without loading anything."""

from tokenforge.cli.main import build_parser


def test_serve_defaults():
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.model, args.served_model_name) == ("127.0.0.1", 8000,
                                                                          "smollm2-135m-instruct", None)


def test_serve_options():
    args = build_parser().parse_args(["serve", "--port", "9000", "--kv-cache-memory", "2GiB", "--max-num-waiting", "4",
                                      "--served-model-name", "tiny", "--max-model-len", "1024", "--log-level", "debug"])
    assert args.kv_cache_memory == 2 << 30 and args.max_num_waiting == 4 and args.served_model_name == "tiny"
    assert args.max_model_len == 1024 and args.port == 9000
