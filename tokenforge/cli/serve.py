"""`tokenforge serve`: load one or more models and serve the OpenAI-compatible API (FastAPI + uvicorn),
routing each request by its `model` field. Models come from repeated --model or a --config TOML file.
"""

import argparse
import functools
import logging
from pathlib import Path

from tokenforge.cli.engine_args import add_engine_args
from tokenforge.cli.serve_config import LOG_LEVELS, serve_config_from_args

GRACEFUL_SHUTDOWN_S = 10  # after draining, uvicorn's own wait for connections to close
DRAIN_TIMEOUT_S = 60.0

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
    parser.add_argument("--drain-timeout", type=float, default=DRAIN_TIMEOUT_S, metavar="SECONDS",
                        help="on SIGTERM / Ctrl-C, answer new requests 503 and let those in flight finish for up "
                             "to this long before exiting; a second signal exits at once (default: %(default)s)")
    control = parser.add_argument_group("control plane (keys, limits, metering)")
    control.add_argument("--auth", default="auto", choices=("auto", "on", "off"),
                         help="require an API key on inference routes; auto (default): on unless --host is a "
                              "loopback address. With auth off, requests are metered to the `local` organisation")
    control.add_argument("--database-url", default=None,
                         help="the store: default $TOKENFORGE_DATABASE_URL, else a SQLite file in the data dir "
                              "($TOKENFORGE_DATA_DIR or ~/.local/share/tokenforge)")
    control.add_argument("--redis-url", default=None,
                         help="rate-limit counters in Redis, shared by several servers (default: $TOKENFORGE_REDIS_URL, "
                              "else in the store)")
    control.add_argument("--pricing", type=Path, default=None, metavar="FILE.toml",
                         help="price book and tier ladder over the embedded defaults")
    control.add_argument("--no-control-plane", action="store_true",
                         help="serve with no keys, limits or metering at all (local experiments only)")
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
                engines[model.served_name] = AsyncEngine.build(functools.partial(build_engine_core, model.engine))
        for name, engine in engines.items():
            console.print(f"Serving [bold]{name}[/bold] at http://{config.host}:{config.port}/v1 "
                          f"(context {engine.core.max_model_len} tokens)")

        import uvicorn

        from tokenforge.server.app import create_app
        from tokenforge.server.draining import DrainingServer

        control, auth_required = _open_control(args, config.host, console)
        app = create_app(engines, owns_engines=True, control=control, auth_required=auth_required)
        uvicorn_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
        DrainingServer(uvicorn_config, app.state.lifecycle, args.drain_timeout).run()
    finally:
        # A no-op after the app's own shutdown; covers a failed load or start (port in use).
        for engine in engines.values():
            engine.shutdown()
    return 0


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def _open_control(args: argparse.Namespace, host: str, console):
    """The control plane the flags ask for (None with --no-control-plane) and whether auth is on;
    prints the bootstrap admin key the one time it is created."""
    if args.no_control_plane:
        if host not in LOOPBACK_HOSTS:
            console.print("[yellow]warning:[/yellow] serving beyond loopback with no keys, limits or metering")
        return None, False
    from tokenforge.config import ControlConfig
    from tokenforge.control.plane import ControlPlane

    config = ControlConfig.from_env(database_url=args.database_url, redis_url=args.redis_url,
                                    pricing_path=args.pricing)
    control, bootstrap_key = ControlPlane.open(config)
    auth_required = args.auth == "on" or (args.auth == "auto" and host not in LOOPBACK_HOSTS)
    if bootstrap_key is not None:
        console.print("The operator's admin API key (shown once, never again; keep it safe):\n"
                      f"  [bold]{bootstrap_key}[/bold]\n"
                      "Create organizations and keys with it (/v1/organizations, /v1/keys) or `tokenforge keys`.")
    console.print(f"API keys: {'required' if auth_required else 'off (requests metered to the local organization)'}")
    return control, auth_required

