"""`tokenforge serve`: load a model and serve the OpenAI-compatible API (FastAPI + uvicorn).

One model per server for now (multi-model serving is future work).
"""

import argparse
import logging

from tokenforge.cli.engine_args import add_engine_args, engine_config_from_args

GRACEFUL_SHUTDOWN_S = 10  # on Ctrl-C / SIGTERM, in-flight requests get this long to finish


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("serve", help="serve a model over the OpenAI API", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--served-model-name", default=None,
                        help="the name clients send as `model` (default: the --model value)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from rich.console import Console

    from tokenforge.engine.async_engine import AsyncEngine
    from tokenforge.engine.factory import build_engine_core

    console = Console(stderr=True)
    with console.status(f"Loading {args.model} ..."):
        engine = AsyncEngine(build_engine_core(engine_config_from_args(args))).start()
    served_name = args.served_model_name or args.model
    console.print(f"Serving [bold]{served_name}[/bold] at http://{args.host}:{args.port}/v1 "
                  f"(context {engine.core.max_model_len} tokens)")

    import uvicorn

    from tokenforge.server.app import create_app

    app = create_app(engine, served_name, owns_engine=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    try:
        uvicorn.Server(config).run()
    finally:
        engine.shutdown()  # a no-op after the app's own shutdown; covers a failed start (port in use)
    return 0
