"""The `promptserve` command: `serve` runs the server; the other commands are the client's, so they work remotely.

A new command (e.g. `bench`) is one entry in COMMANDS: a help line and a function taking the remaining argv.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from promptserve_client import cli as client_cli
from server.api.settings import Settings

Run = Callable[[list[str]], int]


@dataclass(frozen=True)
class Command:
    help: str
    run: Run


# ---- serve


def serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptserve serve",
        description="Serve one frozen backbone (a causal LM, an encoder-decoder or an encoder) and its prompt-learning "
        "tasks over HTTP (one worker per GPU). "
        "Every flag defaults to its PROMPTSERVE_<NAME> environment variable, then to the built-in default.",
    )
    parser.add_argument("--model", help="local directory or Hugging Face id (default: the built-in backbone)")
    parser.add_argument("--store", dest="store_dir",
                        help="task store: a directory, or s3://bucket/prefix with endpoint, region and credentials "
                        "from the AWS_* environment variables (PROMPTSERVE_STORE_DIR)")  # fmt: skip
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--max-batch-size", type=int, help="rows in the running batch")
    parser.add_argument("--max-batch-tokens", type=int, help="KV slots the running batch may hold")
    parser.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--no-demo-tasks", dest="demo_tasks", action="store_const", const=False,
                        help="do not register the demo tasks on first start")  # fmt: skip
    parser.add_argument("--enable-prompt-embeds", dest="enable_prompt_embeds", action="store_const", const=True,
                        help="accept prompt_embeds on /v1/completions (as vLLM's flag)")  # fmt: skip
    parser.add_argument("--no-self-check", dest="self_check", action="store_const", const=False,
                        help="skip the start-up check that the engine decodes like the backbone")  # fmt: skip
    return parser


def serve_settings(argv: Sequence[str]) -> Settings:
    """Flags override the environment, which overrides the defaults."""
    args = serve_parser().parse_args(argv)
    overrides: dict[str, Any] = {name: value for name, value in vars(args).items() if value is not None}
    return Settings(**overrides)


def serve(argv: list[str]) -> int:
    import uvicorn  # the client commands never need the server's dependencies

    from server.api.app import create_app
    from server.api.serving import build_server

    settings = serve_settings(argv)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server: uvicorn.Server | None = None

    def stop(error: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_engine_failure=stop)
    server = build_server(app, settings)
    server.run()
    return 1 if app.state.promptserve.engine_error is not None else 0


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
