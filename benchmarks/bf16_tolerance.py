"""`python -m benchmarks.bf16_tolerance`: how far the engine's bfloat16 log-probabilities stray from the backbone's
own uncached eager forward, on random Llamas, GPT-2s and Gemma-2s of 4 to 32 layers, against the self-check's tolerance.

The self-check (server/engine/selfcheck.py) accepts a served token whose reference log-probability is within
`tolerance_of(bfloat16)` (32 ulps, 0.25 nats) of the reference's best and whose served log-probability is within it of
the reference's. This runs the self-check's own rows (plain, prompt, prefix; inputs of 2 tokens to several blocks; LoRA
and IA3 on every linear layer) through the engine in bfloat16 on the CPU and reports both gaps' distribution over every
token chosen (median, 99th percentile, largest) by family and depth, so the tolerance is a measured margin, not a guess.
The weights are drawn wider than a fresh model's (std `--init-std`) so that logits spread as a trained model's do. Both
sides read the LM head in float32 (server/engine/lm_head.py): what differs is the attention's and the batch's rounding.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import Gemma2Config, GPT2Config, LlamaConfig, PretrainedConfig

from benchmarks.offline import quiet_libraries
from server.engine.backbone import load_backbone
from server.engine.config import EngineConfig
from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, write_random_backbone
from server.engine.engine import Engine
from server.engine.selfcheck import Checks, check_inputs, check_rows, run_through_engine, tolerance_of
from server.engine.selfcheck_modules import reference_deltas

SHAPE = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 2}
SPECIALS = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
GEMMA2 = {  # Gemma-2's own quirks at this width: softcaps, a sliding window the longer rows cross, its query scale
    "head_dim": 32, "sliding_window": 16, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
    "query_pre_attn_scalar": 32,
}  # fmt: skip
FAMILIES = ("llama", "gpt2", "gemma2")


def config_of(family: str, num_layers: int, init_std: float) -> PretrainedConfig:
    common = {"vocab_size": BYTE_VOCAB_SIZE, "num_hidden_layers": num_layers, "max_position_embeddings": 512,
              "initializer_range": init_std, **SHAPE, **SPECIALS}  # fmt: skip
    if family == "gemma2":
        return Gemma2Config(**common, **GEMMA2)
    if family == "gpt2":  # learned positions, layer norms with biases, full multi-head attention
        return GPT2Config(vocab_size=BYTE_VOCAB_SIZE, n_embd=256, n_layer=num_layers, n_head=8, n_positions=512,
                          initializer_range=init_std, **SPECIALS)  # fmt: skip
    return LlamaConfig(**common)


def gaps(directory: Path) -> tuple[list[float], list[float], list[float]]:
    """(best - chosen), |served - reference| and the reference's log-probability of the token chosen, for every token
    of the self-check's rows, bfloat16 (the last shows the model is no near-certain one, where every gap is 0)."""
    backbone = load_backbone(str(directory), "cpu", "bfloat16")
    engine = Engine(backbone, EngineConfig(device="cpu", dtype="bfloat16", kv_cache_bytes=32 << 20))
    checks, inputs = Checks(engine), check_inputs(engine)
    rows = [row.on(input_ids) for input_ids in inputs for row in check_rows(checks, backbone.kind)]
    rows += checks.module_rows(inputs[1])  # LoRA and IA3 on every linear layer, as the self-check runs them
    outputs = run_through_engine(engine, rows)
    choices: list[float] = []
    logprobs: list[float] = []
    chosen_logprobs: list[float] = []
    for row in rows:
        tokens = [token for output in outputs[row.name] for token in output.tokens]
        with reference_deltas(backbone, row.task):
            reference = backbone.kind.reference_logprobs(backbone.model, row, [token.id for token in tokens])
        for token, expected in zip(tokens, reference, strict=True):
            chosen = float(expected[token.id])
            choices.append(float(expected.max()) - chosen)
            logprobs.append(abs(token.logprob - chosen))
            chosen_logprobs.append(chosen)
    return choices, logprobs, chosen_logprobs


def spread(values: list[float]) -> str:
    """Median, 99th percentile and largest."""
    ordered = torch.tensor(values, dtype=torch.float64)
    return " ".join(f"{float(ordered.quantile(q)):7.4f}" for q in (0.5, 0.99)) + f" {float(ordered.max()):7.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_tolerance", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--init-std", type=float, default=0.08)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    tolerance = tolerance_of(torch.bfloat16)
    print(f"bfloat16 on CPU against the uncached eager forward; the self-check's tolerance: {tolerance:g} nats")
    print(f"  {'family':>7} {'layers':>6} {'tokens':>6}   best - chosen (p50 p99 max)   "
          "|served - reference| (p50 p99 max)   log-prob chosen (p50)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="promptserve-bf16-") as scratch:
        for family in args.families:
            for num_layers in args.layers:
                choices: list[float] = []
                logprobs: list[float] = []
                chosen: list[float] = []
                for seed in range(args.seeds):
                    directory = Path(scratch) / f"{family}-{num_layers}-{seed}"
                    write_random_backbone(config_of(family, num_layers, args.init_std), directory, seed=seed)
                    choice, logprob, chosen_logprob = gaps(directory)
                    choices += choice
                    logprobs += logprob
                    chosen += chosen_logprob
                median = float(torch.tensor(chosen).median())
                line = (f"  {family:>7} {num_layers:6d} {len(choices):6d}   {spread(choices)}   {spread(logprobs)}   "
                        f"{median:7.2f}")  # fmt: skip
                print(line, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
