"""`promptserve train`: a JSON Lines file in, a PEFT adapter directory out, and with --register a task served.

Trains a prompt (prompt tuning, P-tuning, prefix tuning) or a LoRA / IA3 adapter with PEFT on the frozen backbone,
with the one loop of server.train.loop. Everything that can refuse the run (the data, the output directory, the
device, the server, its token and its backbone, the task id, the method on this backbone, the adapter's shape under
the store's rules, every pair's length) is checked before the first step; Ctrl-C stops it with nothing written. The
output directory holds adapter_config.json and adapter_model.safetensors (what the store takes), metrics.json (exact
match before and after, the loss curve) and, with matplotlib, loss.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as transformers_logging

from prompt_store.adapter import CONFIG_NAME, MODEL_NAME, StoreLimits, parse_adapter, validate_task_id
from prompt_store.errors import InvalidTask, TaskTooLarge
from prompt_store.modules import SERVED_KINDS
from prompt_store.targets import targets_of
from prompt_store.types import BackboneFingerprint
from server.engine.backbone import (
    eos_token_ids,
    fingerprint_of,
    generation_fingerprint,
    max_positions_of,
    resolve_device,
    resolve_dtype,
)
from server.engine.default_backbone import ensure_default_backbone
from server.engine.errors import first_line
from server.engine.kinds import is_encoder, is_encoder_decoder
from server.train.data import DataError, Pair, encode, held_out_split, input_ids, output_ids, read_pairs
from server.train.evaluate import SLACK, Score, exact_match
from server.train.loop import Batch, Diverged, Example, epoch_batches, make_deterministic, train_loop
from server.train.methods import (
    ALL_LINEAR,
    LORA_DEFAULTS,
    METHODS,
    PEFT_NAMES,
    LoraShape,
    Method,
    default_targets,
    ia3_config,
    lora_config,
    peft_config,
    save_adapter,
)

DEFAULT_MODEL_NAME = "promptserve/default"  # what the server reports as its model id on the built-in backbone
DEFAULT_STEPS = 300
MAX_ENCODER_HIDDEN = 512
SERVED_BACKBONE = ("model_type", "hidden_size", "num_layers", "num_key_value_heads", "head_dim", "vocab_size")
OUTPUT_FILES = frozenset({CONFIG_NAME, MODEL_NAME, "metrics.json", "loss.png", "README.md"})


class TrainRefused(ValueError):
    """The run cannot start, or its result cannot be kept; the message says what was expected and found."""


@dataclass(frozen=True, slots=True)
class Target:
    """Where --register sends the result: the server, its limits and the task id, checked before training."""

    url: str
    token: str | None
    task_id: str
    limits: StoreLimits  # the server's, as /info gives them
    backbone: dict[str, Any]  # the server's model, as /info describes it


@dataclass(frozen=True, slots=True)
class Setup:
    """Everything the run needs, built (and checked) before the first step."""

    model: Any  # the PeftModel over the frozen backbone
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: frozenset[int]  # where the server stops a row
    device: torch.device
    method: Method
    num_virtual_tokens: int  # 0 for LoRA and IA3
    learning_rate: float
    limits: StoreLimits
    fingerprint: BackboneFingerprint  # of the backbone before PEFT wrapped its layers: what the server fingerprints
    rng: random.Random
    adapter: str  # what was trained, in words: "20 virtual tokens", "LoRA rank 8 on q_proj, v_proj"


@dataclass(frozen=True, slots=True)
class Summary:
    method: str
    adapter: str
    num_virtual_tokens: int
    learning_rate: float
    steps: int
    batch_size: int
    seed: int
    num_train: int
    num_eval: int
    exact_match: float | None
    base_exact_match: float | None
    trainable_parameters: int
    seconds: float
    loss_first: float
    loss_last: float


# ---- arguments


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; found {text}")
    return value


def natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer; found {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"expected a positive number; found {text}")
    return value


def dropout(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a dropout probability in [0, 1); found {text}")
    return value


def module_names(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected module names separated by commas (or {ALL_LINEAR}); found {text!r}")
    return names


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1; found {text}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="promptserve train", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="local directory or Hugging Face id of the backbone (default: the built-in one)")
    p.add_argument("--method", required=True, choices=tuple(METHODS))
    p.add_argument("--data", required=True, type=Path, help='JSON Lines: {"input": ..., "output": ...} a line')
    p.add_argument(
        "--output", required=True, type=Path, help="the adapter directory to write (a previous one is replaced)"
    )
    p.add_argument("--eval", type=Path, help="held-out pairs (default: a random --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=fraction, default=0.1)
    p.add_argument("--max-eval", type=positive_int, default=500, help="held-out pairs scored at most")
    p.add_argument("--num-virtual-tokens", type=positive_int, help="prompt, p-tuning, prefix (default: 20)")
    p.add_argument(
        "--learning-rate",
        type=positive_float,
        help="default: 3e-2 for prompt, 3e-3 for p-tuning, prefix and ia3, 1e-3 for lora",
    )
    p.add_argument("--rank", type=positive_int, help=f"lora: the rank r (default: {LORA_DEFAULTS.rank})")
    p.add_argument("--lora-alpha", type=positive_int, help=f"lora: alpha; the delta is scaled by alpha/r "
                   f"(default: {LORA_DEFAULTS.alpha})")  # fmt: skip
    p.add_argument("--lora-dropout", type=dropout, help=f"lora: dropout on the adapter's input while training "
                   f"(default: {LORA_DEFAULTS.dropout})")  # fmt: skip
    p.add_argument(
        "--target-modules",
        type=module_names,
        help="lora, ia3: the layers to adapt, by name, comma-separated (e.g. q_proj,v_proj), or all-linear "
        "(default: PEFT's own choice for the model type, e.g. q_proj,v_proj on Llama and c_attn on GPT-2 for lora, "
        "k_proj,v_proj,down_proj on Llama for ia3; lora takes all-linear where PEFT has none)",
    )
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, help=f"optimizer steps (default: {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=positive_float, help="passes over the training pairs, instead of --steps")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--warmup", type=natural, default=30, help="warm-up steps (at most half the steps)")
    mlp = f"p-tuning's and prefix's MLP width (default: the hidden size, at most {MAX_ENCODER_HIDDEN})"
    p.add_argument("--encoder-hidden-size", type=positive_int, help=mlp)
    p.add_argument("--seed", type=int, default=0, help="the same seed, data and versions give the same adapter")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars (there are none when not on a terminal)")
    p.add_argument("--register", metavar="URL", help="register the result with the server at URL")
    p.add_argument("--task-id", help="the id to register it under (default: the output directory's name)")
    p.add_argument("--token", default=os.environ.get("PROMPTSERVE_ADMIN_TOKEN"),
                   help="the server's admin token (default: $PROMPTSERVE_ADMIN_TOKEN)")  # fmt: skip
    return p


def main(argv: Sequence[str]) -> int:
    args = parser().parse_args(argv)
    args.output = args.output.absolute()
    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        target, summary = train(args)
    except (DataError, TrainRefused, Diverged) as error:
        print(f"promptserve train: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"promptserve train: interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    try:
        report(summary, args.output)
        return 0 if target is None else register(target, args.output)
    except KeyboardInterrupt:
        print(f"promptserve train: interrupted; {args.output} was written, not registered", file=sys.stderr)
        return 130


def train(args: argparse.Namespace) -> tuple[Target | None, Summary]:
    """Everything up to the adapter written: checks first, then the run."""
    check_flags(args)
    train_pairs, eval_pairs = load_pairs(args)
    check_output(args.output)
    target = check_server(args)
    setup = prepare(args, target)
    return target, fit(args, setup, train_pairs, eval_pairs)


def quiet_libraries() -> None:
    """The libraries' deprecation notes and loading bars are for their developers, not for this command's user."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")  # PEFT sets it for GPT-2's Conv1D
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


# ---- before training: everything that could refuse the run


def load_pairs(args: argparse.Namespace) -> tuple[list[Pair], list[Pair]]:
    pairs = read_pairs(args.data)
    rng = random.Random(args.seed)
    if args.eval is None:
        return held_out_split(pairs, args.eval_fraction, rng, args.max_eval)
    held_out = read_pairs(args.eval)
    return pairs, held_out if len(held_out) <= args.max_eval else rng.sample(held_out, args.max_eval)


def check_output(output: Path) -> None:
    """The output is replaced as a whole: it must be absent, or a directory of its own holding only what this
    command writes, and its parent must take a new directory."""
    if output == Path.cwd() or output in Path.cwd().parents:
        raise TrainRefused(f"expected --output to name a directory of its own; found the working directory {output}")
    if output.exists() and not output.is_dir():
        raise TrainRefused(f"expected --output to be a directory or absent; found a file at {output}")
    if output.is_dir():
        others = sorted(path.name for path in output.iterdir() if path.name not in OUTPUT_FILES)
        if others:
            raise TrainRefused(
                f"expected --output to be absent or a previous adapter directory (it is replaced as a whole); "
                f"found {output} holding {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
            )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=output.parent).cleanup()
    except OSError as error:
        raise TrainRefused(f"expected to write a directory beside {output}; found: {error}") from None


def check_server(args: argparse.Namespace) -> Target | None:
    """With --register: a server that answers, takes the token, and will take the id; None without --register."""
    if args.register is None:
        return None
    task_id = args.task_id or args.output.name
    try:
        validate_task_id(task_id)
    except InvalidTask as error:
        hint = "" if args.task_id else " (the output directory's name; give --task-id)"
        raise TrainRefused(f"{error}{hint}") from None
    from promptserve_client import Client, NotFoundError, PromptserveError, UnauthorizedError

    try:
        with Client(args.register, token=args.token) as client:
            info = client.info()
            client.delete_task(f"promptserve-train-{uuid.uuid4().hex}")  # no such task: 404, or 401 for the token
    except NotFoundError:
        pass
    except UnauthorizedError as error:
        raise TrainRefused(f"expected an admin token the server at {args.register} takes (--token); {error}") from None
    except (PromptserveError, httpx.HTTPError, httpx.InvalidURL) as error:
        raise TrainRefused(f"expected a promptserve server at {args.register}; found: {error}") from None
    backbone = {name: getattr(info, name) for name in SERVED_BACKBONE}
    rank = {"max_lora_rank": info.max_lora_rank} if info.max_lora_rank is not None else {}
    limits = StoreLimits(max_virtual_tokens=info.max_virtual_tokens, **rank)
    return Target(args.register, args.token, task_id, limits, backbone)


def prepare(args: argparse.Namespace, target: Target | None) -> Setup:
    """The frozen backbone under the method's PEFT model, and proof that what it saves, the server takes."""
    source = args.model or str(ensure_default_backbone())
    device = checked_device(args.device)
    rng = make_deterministic(args.seed)  # before PEFT initialises the prompt
    tokenizer, backbone = load_frozen(source, resolve_dtype(args.dtype, device), device)
    if target is not None:
        check_same_backbone(backbone, target)
    method = METHODS[args.method]
    num_virtual = (args.num_virtual_tokens or method.num_virtual_tokens) if method.is_prompt_learning else 0
    fingerprint = generation_fingerprint(backbone)  # before PEFT: LoRA and IA3 replace its layers in place
    config, adapter = method_config(args, method, backbone, num_virtual, fingerprint)
    model = wrap(backbone, config, method, device)
    limits = target.limits if target else StoreLimits()
    with tempfile.TemporaryDirectory(prefix="promptserve-train-") as directory:
        model.save_pretrained(directory)  # the untrained adapter: a shape the store refuses fails now
        check_storable(Path(directory), fingerprint, limits)
    learning_rate = args.learning_rate or method.learning_rate
    eos = eos_token_ids(backbone, tokenizer)
    return Setup(model, tokenizer, eos, device, method, num_virtual, learning_rate, limits, fingerprint, rng, adapter)


FLAGS_OF = {  # the flags that shape one kind of adapter, and the methods that take them
    ("num_virtual_tokens", "encoder_hidden_size"): ("prompt", "p-tuning", "prefix"),
    ("rank", "lora_alpha", "lora_dropout"): ("lora",),
    ("target_modules",): ("lora", "ia3"),
}


def check_flags(args: argparse.Namespace) -> None:
    """A flag the method does not read is a mistake in the command, not something to ignore."""
    for names, methods in FLAGS_OF.items():
        for name in names:
            if getattr(args, name) is not None and args.method not in methods:
                flag = "--" + name.replace("_", "-")
                wanted = " or ".join(methods)
                raise TrainRefused(f"expected {flag} with --method {wanted}; found --method {args.method}")


def method_config(
    args: argparse.Namespace, method: Method, backbone: PreTrainedModel, num_virtual: int, fp: BackboneFingerprint
) -> Any:
    """The method's PEFT configuration for this backbone, and what it trains, in words."""
    model_type = backbone.config.model_type
    if method.is_prompt_learning:
        hidden = backbone.config.get_text_config().hidden_size
        encoder_hidden = args.encoder_hidden_size or min(hidden, MAX_ENCODER_HIDDEN)
        return peft_config(method.name, num_virtual, encoder_hidden), f"{num_virtual} virtual tokens"
    if args.target_modules and args.target_modules != (ALL_LINEAR,):
        check_target_names(args.target_modules, fp)
    try:
        targets = args.target_modules or default_targets(method.name, model_type)
    except ValueError as error:
        raise TrainRefused(str(error)) from None
    where = targets if isinstance(targets, str) else ", ".join(targets)
    if method.name == "ia3":  # all-linear by the layers' names: PEFT checks feedforward_modules against them
        named = linear_layer_names(fp) if args.target_modules == (ALL_LINEAR,) else args.target_modules
        return ia3_config(model_type, named), f"IA3 on {where}"
    shape = LoraShape(
        rank=args.rank or LORA_DEFAULTS.rank,
        alpha=args.lora_alpha or LORA_DEFAULTS.alpha,
        dropout=LORA_DEFAULTS.dropout if args.lora_dropout is None else args.lora_dropout,
        target_modules=args.target_modules,
    )
    return lora_config(model_type, shape), f"LoRA rank {shape.rank}, alpha {shape.alpha} on {where}"


def check_target_names(targets: tuple[str, ...], fp: BackboneFingerprint) -> None:
    """Every name given must name a module, as PEFT matches a list's names (PEFT itself asks it of one name only, and
    silently trains the rest: a typo would drop a layer)."""
    names = [module.name for module in fp.modules]
    for key in targets:
        if not targets_of({"target_modules": [key]}, names):
            raise TrainRefused(
                f"expected --target-modules naming modules of the {fp.model_type} backbone (its linear layers: "
                f"{', '.join(linear_layer_names(fp))}; or {ALL_LINEAR}); found {key!r}, which names none"
            )


def linear_layer_names(fp: BackboneFingerprint) -> tuple[str, ...]:
    """The last names of the backbone's linear layers an adapter may target (PEFT's all-linear), in model order."""
    return tuple(dict.fromkeys(m.name.rsplit(".", 1)[-1] for m in fp.modules if m.kind in SERVED_KINDS))


def checked_device(name: str) -> torch.device:
    try:
        device = resolve_device(name)
        torch.empty(0, device=device)
    except (RuntimeError, ValueError, AssertionError) as error:
        raise TrainRefused(
            f"expected a device this machine has (auto, cpu, cuda, cuda:N); found {name!r}: {error}"
        ) from None
    return device


def load_frozen(source: str, dtype: torch.dtype, device: torch.device) -> tuple[Any, PreTrainedModel]:
    try:
        check_causal(source, AutoConfig.from_pretrained(source))
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except TrainRefused:
        raise
    except (OSError, ValueError, KeyError) as error:  # transformers' may list every class it knows: its first line
        raise TrainRefused(
            f"expected a causal LM (a directory or Hugging Face id) at {source}; found: {first_line(error)}"
        ) from None
    model.to(device)  # type: ignore[arg-type]
    return tokenizer, model.eval().requires_grad_(False)


def check_causal(source: str, config: PretrainedConfig) -> None:
    """An encoder-decoder or an encoder is served with tasks of other types, which PEFT trains with other heads:
    AutoModelForCausalLM would load BERT or RoBERTa as a decoder and train a task no server of theirs takes."""
    if is_encoder_decoder(config):
        found, page = f"a {config.model_type} encoder-decoder", "docs/encoder-decoders.md"
    elif is_encoder(config):
        found, page = f"a {config.model_type} encoder", "docs/classification.md"
    else:
        return
    raise TrainRefused(
        f"expected a causal LM at {source} (promptserve train trains a causal LM's tasks); found {found}, served "
        f"with tasks trained with PEFT itself ({page})"
    )


def check_same_backbone(backbone: PreTrainedModel, target: Target) -> None:
    fingerprint = fingerprint_of(backbone)
    mine = {name: getattr(fingerprint, name) for name in SERVED_BACKBONE}
    if mine != target.backbone:
        raise TrainRefused(
            f"expected the server at {target.url} to serve this backbone {mine}; found {target.backbone}"
        )


def wrap(backbone: PreTrainedModel, config: Any, method: Method, device: torch.device) -> Any:
    from peft import get_peft_model

    try:
        model = get_peft_model(backbone, config)
    except (ValueError, TypeError, AttributeError, KeyError, NotImplementedError) as error:
        model_type = backbone.config.model_type
        raise TrainRefused(
            f"expected a backbone that takes --method {method.name}; found {model_type}: {error}"
        ) from None
    return model.to(device)


def check_storable(directory: Path, fingerprint: BackboneFingerprint, limits: StoreLimits) -> None:
    """Read an adapter directory back as the store would."""
    config, weights = (directory / name for name in (CONFIG_NAME, MODEL_NAME))
    try:
        parse_adapter(config.read_bytes(), weights.read_bytes(), fingerprint, limits)
    except (InvalidTask, TaskTooLarge) as error:
        raise TrainRefused(f"expected an adapter the server takes; this one would be refused: {error}") from None


def encode_all(setup: Setup, train_pairs: list[Pair], eval_pairs: list[Pair]) -> list[Example]:
    """The training examples; every pair, trained on or scored, must fit the backbone beside the virtual tokens."""
    limit = max_positions_of(setup.model.get_base_model())
    examples = [encode(pair, setup.tokenizer, setup.eos_token_ids) for pair in train_pairs]
    needs = [(pair, len(ids)) for pair, (ids, _) in zip(train_pairs, examples, strict=True)]
    slack = SLACK if setup.eos_token_ids else 0
    for pair in eval_pairs:
        answer = output_ids(pair, setup.tokenizer, setup.eos_token_ids)
        needs.append((pair, len(input_ids(pair, setup.tokenizer)) + len(answer) + slack))
    beside = f" beside {setup.num_virtual_tokens} virtual tokens" if setup.num_virtual_tokens else ""
    for pair, length in needs:
        if limit is not None and length + setup.num_virtual_tokens > limit:
            raise DataError(
                f"{pair.where}: expected a pair that fits the backbone's {limit} positions{beside}; "
                f"found one of {length} tokens"
            )
    return examples


# ---- training


def fit(args: argparse.Namespace, setup: Setup, train_pairs: list[Pair], eval_pairs: list[Pair]) -> Summary:
    model, tokenizer, eos = setup.model, setup.tokenizer, setup.eos_token_ids
    progress = False if args.quiet else None
    examples = encode_all(setup, train_pairs, eval_pairs)
    base = exact_match(model.get_base_model(), tokenizer, eval_pairs, eos, progress)
    pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
    steps = num_steps(args, len(examples))
    trainable = [p for p in model.parameters() if p.requires_grad]
    print(f"training {setup.method.name} on {len(examples)} pairs for {steps} steps on {setup.device}", flush=True)
    model.train()
    started = time.monotonic()
    losses = train_loop(
        trainable,
        loss_function(model, setup.device),
        epoch_batches(examples, setup.rng, args.batch_size, pad_id),
        steps,
        setup.learning_rate,
        warmup=min(args.warmup, steps // 2),
        progress=progress,
    )
    seconds = time.monotonic() - started
    model.eval()
    trained = exact_match(model, tokenizer, eval_pairs, eos, progress)
    window = max(1, min(10, len(losses) // 2))
    summary = Summary(
        setup.method.name, setup.adapter, setup.num_virtual_tokens, setup.learning_rate, steps, args.batch_size,
        args.seed, len(train_pairs), len(eval_pairs), trained.exact_match, base.exact_match,
        sum(p.numel() for p in trainable), seconds, mean(losses[:window]), mean(losses[-window:]),
    )  # fmt: skip
    base_name = args.model or DEFAULT_MODEL_NAME
    save_adapter(model, args.output, base_name, extra=outputs_writer(setup, summary, losses, trained))
    return summary


def num_steps(args: argparse.Namespace, num_examples: int) -> int:
    if args.epochs:
        return max(1, math.ceil(args.epochs * num_examples / args.batch_size))
    return int(args.steps or DEFAULT_STEPS)


def loss_function(model: Any, device: torch.device) -> Callable[[Batch], torch.Tensor]:
    def loss_of(batch: Batch) -> torch.Tensor:
        return model(  # type: ignore[no-any-return]
            input_ids=batch.input_ids.to(device),
            attention_mask=batch.attention_mask.to(device),
            labels=batch.labels.to(device),
        ).loss

    return loss_of


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


# ---- after training


def outputs_writer(setup: Setup, summary: Summary, losses: list[float], score: Score) -> Callable[[Path], None]:
    """What goes beside the adapter, once the trained adapter itself reads back as the store would take it."""

    def write(directory: Path) -> None:
        check_storable(directory, setup.fingerprint, setup.limits)
        misses = [{"input": i, "expected": e, "got": g} for i, e, g in score.examples]
        record = {**asdict(summary), "method_peft": PEFT_NAMES[summary.method], "loss_curve": losses, "misses": misses}
        (directory / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
        plot_losses(losses, directory / "loss.png")

    return write


def plot_losses(losses: list[float], path: Path) -> None:
    """The loss curve as a PNG, when matplotlib is installed (`pip install 'promptserve[plot]'`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
    axes.plot(range(1, len(losses) + 1), losses, linewidth=1)
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    axes.set_yscale("log")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def report(summary: Summary, output: Path) -> None:
    print(
        f"trained {summary.method} ({summary.adapter}, {summary.trainable_parameters:,} "
        f"trainable parameters) for {summary.steps} steps in {summary.seconds:.1f} s; "
        f"loss {summary.loss_first:.3f} -> {summary.loss_last:.3f}"
    )
    if summary.exact_match is None or summary.base_exact_match is None:
        print("no held-out pairs to score (give --eval, or more than one pair)")
    else:
        print(
            f"exact match on {summary.num_eval} held-out pairs: {summary.exact_match:.1%} "
            f"(the backbone without the task: {summary.base_exact_match:.1%})"
        )
    print(f"wrote {output} (adapter_config.json, adapter_model.safetensors, metrics.json)")


def register(target: Target, output: Path) -> int:
    from promptserve_client import Client, PromptserveError

    try:
        with Client(target.url, token=target.token) as client:
            record = client.register_task(target.task_id, output)
    except (PromptserveError, httpx.HTTPError) as error:
        print(
            f"promptserve train: the server at {target.url} did not register the task: {error}\n"
            f"the adapter is kept: promptserve tasks add {target.task_id} {output} --url {target.url}",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(record.model_dump(mode="json"), indent=2))
    return 0
