"""The client's command line: `tasks add|ls|rm`, `generate`, `classify`, `score`, `health`, `info` against a server.

`promptserve <command>` delegates here too, so every command works against a remote server (--url).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx

from promptserve_client._protocol import DEFAULT_URL
from promptserve_client.client import Client
from promptserve_client.errors import PromptserveError
from promptserve_client.models import Details, LabelScore, Prediction, ScoreResponse, TaskRecord, TokenLabel

Handler = Callable[[Client, argparse.Namespace], None]
COMMANDS = ("tasks", "generate", "classify", "score", "health", "info")


# ---- commands


def tasks_add(client: Client, args: argparse.Namespace) -> None:
    record = client.register_task(args.task_id, args.adapter_dir, labels=split_names(args.labels))
    print(f"registered {record.task_id} version {record.version} ({size_of(record)}, {record.bytes} bytes)")
    if record.labels:
        print(f"labels: {', '.join(record.labels)}")


def tasks_ls(client: Client, args: argparse.Namespace) -> None:
    records = client.list_tasks()
    if args.json:
        print(json.dumps([record.model_dump(mode="json") for record in records], indent=2))
    else:
        print(format_table(records))


def tasks_rm(client: Client, args: argparse.Namespace) -> None:
    client.delete_task(args.task_id)
    print(f"deleted {args.task_id}")


def generate(client: Client, args: argparse.Namespace) -> None:
    target = generation_target(args)
    parameters = generation_parameters(args)
    if args.stream:
        details = None
        for event in client.generate_stream(args.text, **target, **parameters):
            if event.token is not None:
                print(event.token.text, end="", flush=True)
            details = event.details or details
        print()
    else:
        response = client.generate(args.text, **target, **parameters)
        print(response.generated_text)
        details = response.details
    if args.details and details is not None:
        print(format_details(details))


def classify(client: Client, args: argparse.Namespace) -> None:
    target = {"task_ids": split_names(args.tasks), "ensemble": args.ensemble} if args.tasks else {"task_id": args.task}
    response = client.classify(args.texts, **target, top_k=args.top_k)
    if args.json:
        print(json.dumps(response.model_dump(mode="json"), indent=2))
    else:
        for prediction in response.predictions:
            print(format_prediction(prediction))


def score(client: Client, args: argparse.Namespace) -> None:
    candidates: list[str] = args.candidate or split_names(args.candidates) or []  # argparse requires one of them
    target = {"task_ids": split_names(args.tasks)} if args.tasks else {"task_id": args.task}
    response = client.score(args.text, candidates, **target)
    print(json.dumps(response.model_dump(mode="json"), indent=2) if args.json else format_scores(response))


def health(client: Client, args: argparse.Namespace) -> None:
    print(client.health().status)


def info(client: Client, args: argparse.Namespace) -> None:
    print(json.dumps(client.info().model_dump(mode="json"), indent=2))


# ---- formatting


def size_of(r: TaskRecord) -> str:
    """What the task adds to the backbone: a LoRA task's rank, IA3's scales, else its virtual tokens."""
    if r.rank is not None:
        return f"{r.method} rank {r.rank}"
    return r.method if r.method == "ia3" else f"{r.method}, {r.num_virtual_tokens} virtual tokens"


def format_table(records: Sequence[TaskRecord]) -> str:
    header = ("TASK_ID", "VERSION", "METHOD", "TASK_TYPE", "VIRTUAL_TOKENS", "RANK", "BYTES", "CREATED_AT")
    rows = [header] + [table_row(r) for r in records]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


def table_row(r: TaskRecord) -> tuple[str, ...]:
    created = r.created_at.isoformat()
    rank = "-" if r.rank is None else str(r.rank)
    return (r.task_id, str(r.version), r.method, r.task_type or "-", str(r.num_virtual_tokens), rank, str(r.bytes),
            created)  # fmt: skip


def format_details(details: Details) -> str:
    return json.dumps(details.model_dump(mode="json", exclude_none=True), indent=2)


def format_prediction(prediction: Prediction) -> str:
    """One input's line: `label score` pairs, highest first, or `token/label score` for each token."""
    return "  ".join(format_entry(entry) for entry in prediction)


def format_entry(entry: LabelScore | TokenLabel) -> str:
    name = f"{entry.token}/{entry.label}" if isinstance(entry, TokenLabel) else entry.label
    return f"{name} {entry.score:.4f}"


def format_scores(response: ScoreResponse) -> str:
    """One line a candidate, in the order given; `*` marks the best."""
    width = max((len(s.candidate) for s in response.scores), default=0)
    return "\n".join(
        f"{'*' if s.candidate == response.best else ' '} {s.candidate.ljust(width)}  logprob {s.logprob:.4f}  "
        f"mean {s.mean_logprob:.4f}  ({s.num_tokens} tokens)"
        for s in response.scores
    )


def split_names(names: str | None) -> list[str] | None:
    """`a, b,c` -> ["a", "b", "c"]; None stays None."""
    return None if names is None else [name.strip() for name in names.split(",") if name.strip()]


def generation_target(args: argparse.Namespace) -> dict[str, Any]:
    if args.tasks:
        return {"task_ids": split_names(args.tasks), "ensemble": args.ensemble}
    return {"task_id": args.task}


def generation_parameters(args: argparse.Namespace) -> dict[str, Any]:
    given = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample or None,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": args.stop,
        "details": args.details or None,
    }
    return {name: value for name, value in given.items() if value is not None}


# ---- parsing


def connection_options() -> argparse.ArgumentParser:
    options = argparse.ArgumentParser(add_help=False)
    group = options.add_argument_group("connection")
    group.add_argument(
        "--url",
        default=os.environ.get("PROMPTSERVE_URL", DEFAULT_URL),
        help="server URL (env PROMPTSERVE_URL; default %(default)s)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("PROMPTSERVE_ADMIN_TOKEN") or os.environ.get("PROMPTSERVE_API_KEY"),
        help="bearer token: the admin token for writes, or an API key (env PROMPTSERVE_ADMIN_TOKEN, then "
        "PROMPTSERVE_API_KEY)",
    )
    group.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for an answer")
    return options  # fmt: skip


def add_tasks_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    tasks = commands.add_parser("tasks", help="register, list and delete tasks")
    sub = tasks.add_subparsers(dest="tasks_command", required=True, metavar="{add,ls,rm}")
    add = sub.add_parser("add", parents=[common], help="register a PEFT adapter directory (or a new version)")
    add.add_argument("task_id")
    add.add_argument("adapter_dir", type=Path, help="holds adapter_config.json and adapter_model.safetensors")
    add.add_argument(
        "--labels",
        help="comma-separated label names of a classification task, class 0 first "
        "(default: the id2label of a config.json in adapter_dir, if there is one)",
    )
    add.set_defaults(handler=tasks_add)
    ls = sub.add_parser("ls", parents=[common], help="list the registered tasks")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ls.set_defaults(handler=tasks_ls)
    rm = sub.add_parser("rm", parents=[common], help="delete a task")
    rm.add_argument("task_id")
    rm.set_defaults(handler=tasks_rm)


def add_generate_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    gen = commands.add_parser("generate", parents=[common], help="generate text under a task or an ensemble")
    gen.add_argument("text")
    target = gen.add_mutually_exclusive_group()
    target.add_argument("--task", help="task id (default: the bare backbone)")
    target.add_argument("--tasks", help="comma-separated task ids: a prompt ensemble")
    gen.add_argument("--ensemble", choices=("vote", "mean"), default="vote")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="a stop sequence (repeatable)")
    gen.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    gen.add_argument("--details", action="store_true", help="print the details (tokens, finish reason) as JSON")
    gen.set_defaults(handler=generate)


def add_target_options(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--task", help="task id")
    target.add_argument("--tasks", help="comma-separated task ids: a prompt ensemble")
    parser.add_argument("--json", action="store_true", help="print the server's JSON answer")


def add_classify_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    cls = commands.add_parser(
        "classify",
        parents=[common],
        help="label texts under a SEQ_CLS or TOKEN_CLS task or an ensemble",
        description="Prints one line per text, in order: `label score` pairs, highest first "
        "(a sequence task), or `token/label score` for each token (a token task).",
    )
    cls.add_argument("texts", nargs="+", metavar="text")
    add_target_options(cls)
    cls.add_argument("--ensemble", choices=("mean",), help="how an ensemble's members combine (default: the server's)")
    cls.add_argument("--top-k", type=int, help="the k best labels (default: every label)")
    cls.set_defaults(handler=classify)


def add_score_command(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    sc = commands.add_parser(
        "score",
        parents=[common],
        help="rank candidate answers by log-probability under a generation task",
        description="Prints one line per candidate, in order, with its summed and mean token log-probability; "
        "`*` marks the best.",
    )
    sc.add_argument("text")
    candidates = sc.add_mutually_exclusive_group(required=True)
    candidates.add_argument("--candidate", action="append", help="a candidate answer (repeatable)")
    candidates.add_argument("--candidates", help="comma-separated candidate answers")
    add_target_options(sc)
    sc.set_defaults(handler=score)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or "promptserve-client", description="Talk to a promptserve server.")
    common = connection_options()
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    add_tasks_commands(commands, common)
    add_generate_command(commands, common)
    add_classify_command(commands, common)
    add_score_command(commands, common)
    commands.add_parser("health", parents=[common], help="is the model loaded?").set_defaults(handler=health)
    commands.add_parser("info", parents=[common], help="the model and the server limits").set_defaults(handler=info)
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None, client: Client | None = None) -> int:
    """Run one command; `client` (tests) replaces the one built from --url, --token and --timeout."""
    args = build_parser(prog).parse_args(argv)
    try:
        with client or Client(args.url, token=args.token, timeout=args.timeout) as connected:
            args.handler(connected, args)
    except PromptserveError as exc:
        print(f"error ({exc.error_type}): {exc.message}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"error: no answer from {args.url}: {exc}", file=sys.stderr)
        return 1
    except (OSError, TypeError, ValueError) as exc:  # a missing file, a malformed config.json
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
