"""`tokenforge serve`: load one or more models and serve the OpenAI-compatible API (FastAPI + uvicorn),
routing each request by its `model` field. Models come from repeated --model or a --config TOML file.
"""

import argparse
import logging
from pathlib import Path

from tokenforge.cli.engine_args import add_engine_args
from tokenforge.cli.serve_config import LOG_LEVELS, serve_config_from_args

GRACEFUL_SHUTDOWN_S = 10  # on Ctrl-C / SIGTERM, in-flight requests get this long to finish

_EPILOG = """\
config file (--config): TOML; top-level host, port, log_level and engine options for every model, then
one [[models]] table per model with `model`, an optional `served_name` and its own engine options
(same names as the flags, with underscores: kv_cache_memory = "1GiB", max_num_seqs = 64). The file's
values override the command line's.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="serve models over the OpenAI API", description=__doc__,
                                   epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--served-model-name", action="append", default=None,
                        help="the name clients send as `model`, one per --model in the same order "
                             "(default: the --model value)")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE.toml",
                        help="serve the models listed in this TOML file (see below)")
    parser.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    add_engine_args(parser, repeat_model=True)
    return parser


def run(args: argparse.Namespace) -> int:
    config = serve_config_from_args(args)  # a bad file or flag fails before anything loads
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rich.console import Console

    from tokenforge.engine.async_engine import AsyncEngine
    from tokenforge.engine.factory import build_engine_core

    console = Console(stderr=True)
    engines: dict[str, AsyncEngine] = {}
    try:
        for model in config.models:
            with console.status(f"Loading {model.engine.model.model} ..."):
                engines[model.served_name] = AsyncEngine(build_engine_core(model.engine)).start()
        for name, engine in engines.items():
            console.print(f"Serving [bold]{name}[/bold] at http://{config.host}:{config.port}/v1 "
                          f"(context {engine.core.max_model_len} tokens)")

        import uvicorn

        from tokenforge.server.app import create_app

        app = create_app(engines, owns_engines=True)
        uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        uvicorn.Server(uvicorn_config).run()
    finally:
        # A no-op after the app's own shutdown; covers a failed load or start (port in use).
        for engine in engines.values():
            engine.shutdown()
    return 0
