"""The `promptserve` command: `serve` runs the server; the other commands are the client's, so they work remotely.

A new command (e.g. `bench`) is one entry in COMMANDS: a help line and a function taking the remaining argv.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from promptserve_client import cli as client_cli
from server.api.settings import ConfigurationError, Settings, SettingSpec, load_settings, setting_specs

if typing.TYPE_CHECKING:
    from server.api.metrics import Metrics  # imports the engine's types: not before the start-up checks

Run = Callable[[list[str]], int]
FLAG_ALIASES = {"store_dir": ("--store",)}  # the short names the first flags had


@dataclass(frozen=True)
class Command:
    help: str
    run: Run


# ---- serve


def serve_parser() -> argparse.ArgumentParser:
    """One flag per setting (server/api/settings.py), with its help, default and variable."""
    parser = argparse.ArgumentParser(
        prog="promptserve serve",
        description="Serve one frozen backbone (a causal LM, an encoder-decoder or an encoder) and its prompt-learning "
        "tasks over HTTP (one worker per GPU). Every flag defaults to its PROMPTSERVE_<NAME> environment variable, "
        "then to the built-in default.",
    )
    for spec in setting_specs():
        add_setting_flag(parser, spec)
    return parser


def add_setting_flag(parser: argparse.ArgumentParser, spec: SettingSpec) -> None:
    help = f"{spec.help} (default: {spec.shown_default}; {spec.variable})".replace("%", "%%")
    names = [spec.flag, *FLAG_ALIASES.get(spec.name, ())]
    if spec.annotation is bool:
        parser.add_argument(*names, dest=spec.name, action=argparse.BooleanOptionalAction, help=help)
    elif typing.get_origin(spec.annotation) is Literal:
        parser.add_argument(*names, dest=spec.name, choices=typing.get_args(spec.annotation), help=help)
    else:
        parser.add_argument(*names, dest=spec.name, metavar=spec.name.upper(), help=help)


def serve_settings(argv: Sequence[str]) -> Settings:
    """Flags override the environment, which overrides the defaults; a bad one is a ConfigurationError."""
    args = serve_parser().parse_args(argv)
    given: dict[str, Any] = {name: value for name, value in vars(args).items() if value is not None}
    return load_settings(given, lambda name: "--" + name.replace("_", "-"))


def serve(argv: list[str]) -> int:
    """Settings, then the port, the store and the model are checked before the model loads: a wrong one stops the
    start in seconds with one line (its traceback at debug)."""
    try:
        settings = serve_settings(argv)
    except ConfigurationError as error:
        print(f"promptserve serve: {error}", file=sys.stderr)
        return 2
    from server.api.preflight import StartupError, bind_port, check_before_loading

    configure_logging(settings.log_level)
    try:
        listening = bind_port(settings)
        check_before_loading(settings)
    except StartupError as error:
        logging.getLogger(__name__).debug("the start-up check failed", exc_info=error)
        print(f"promptserve serve: {error}", file=sys.stderr)
        return 1
    import uvicorn  # after the checks: the app's imports (torch, transformers) take seconds

    from server.api.app import create_app
    from server.api.serving import build_server

    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_engine_failure=stop)
    try:
        serve_metrics_port(app.state.promptserve.metrics, settings)
    except StartupError as error:
        print(f"promptserve serve: {error}", file=sys.stderr)
        return 1
    server = build_server(app, settings)
    server.run(sockets=[listening])
    return 1 if app.state.promptserve.engine_error is not None else 0


def serve_metrics_port(metrics: Metrics, settings: Settings) -> None:
    """--metrics-port: /metrics alone on a port of its own too, as each Ray replica serves it; bound before the model
    loads, so a port in use stops the start in one line."""
    from server.api.preflight import StartupError

    if settings.metrics_port is None:
        return
    try:
        port = metrics.serve(settings.host, settings.metrics_port)
    except OSError as error:
        raise StartupError(
            "metrics_port", settings.metrics_port,
            f"expected a port free to listen on; found {settings.host}:{settings.metrics_port}: {error.strerror}",
        ) from error  # fmt: skip
    logging.getLogger(__name__).info("/metrics also on port %d", port)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "debug":  # boto3 reports where it found credentials at info, on every client
        for noisy in ("botocore", "boto3"):
            logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


# ---- dispatch


def bench(argv: list[str]) -> int:
    try:
        from benchmarks.serving import main as bench_main
    except ImportError as error:
        print(f"promptserve bench needs the benchmarks package of a source checkout ({error})", file=sys.stderr)
        return 2
    return bench_main(argv)


def train(argv: list[str]) -> int:
    try:
        from server.train.cli import main as train_main
    except ImportError as error:
        print(f"promptserve train needs the train extra: pip install 'promptserve[train]' ({error})", file=sys.stderr)
        return 2
    return train_main(argv)


def delegate_to_client(name: str) -> Run:
    return lambda argv: client_cli.main([name, *argv], prog="promptserve")


COMMANDS: dict[str, Command] = {
    "serve": Command("run the server", serve),
    "tasks": Command("register, list and delete tasks on a server", delegate_to_client("tasks")),
    "generate": Command("generate text under a task or an ensemble", delegate_to_client("generate")),
    "classify": Command("label texts under a SEQ_CLS or TOKEN_CLS task or an ensemble", delegate_to_client("classify")),
    "score": Command("rank candidate answers by log-probability under a task", delegate_to_client("score")),
    "health": Command("is the server's model loaded?", delegate_to_client("health")),
    "info": Command("the server's model and limits", delegate_to_client("info")),
    "train": Command("train a task with PEFT from a JSON Lines file (and register it with --register)", train),
    "bench": Command("load-test a running server (request rate, task popularity, TTFT/TPOT)", bench),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"  {name.ljust(width)}  {command.help}" for name, command in COMMANDS.items()]
    return "usage: promptserve <command> [options]   (promptserve <command> -h for its options)\n\ncommands:\n" + (
        "\n".join(lines)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    command = COMMANDS.get(args[0])
    if command is None:
        print(f"promptserve: unknown command {args[0]!r}; expected one of {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    return command.run(args[1:])


if __name__ == "__main__":
    sys.exit(main())
