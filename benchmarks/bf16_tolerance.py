"""`python -m benchmarks.bf16_tolerance`: how far the engine's bfloat16 log-probabilities stray from the backbone's
own uncached eager forward, on random Llamas of 4 to 32 layers, against the self-check's tolerance.

The self-check (server/engine/selfcheck.py) accepts a served token whose reference log-probability is within
`tolerance_of(bfloat16)` (32 ulps, 0.25 nats) of the reference's best and whose served log-probability is within it
of the reference's. This runs the self-check's own rows (plain, prompt, prefix; inputs of 2 tokens to several
blocks) through the engine in bfloat16 on the CPU and reports the largest of both gaps by depth, so the tolerance is
a measured margin, not a guess. The weights are drawn wider than a fresh model's (std `--init-std`) so that logits
spread as a trained model's do.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig

from benchmarks.offline import quiet_libraries
from server.engine.backbone import load_backbone
from server.engine.config import EngineConfig
from server.engine.default_backbone import BOS_ID, BYTE_VOCAB_SIZE, EOS_ID, PAD_ID, write_random_backbone
from server.engine.engine import Engine
from server.engine.selfcheck import Checks, check_inputs, check_rows, run_through_engine, tolerance_of


def llama(num_layers: int, init_std: float) -> LlamaConfig:
    shape = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 8, "num_key_value_heads": 2}
    specials = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    return LlamaConfig(vocab_size=BYTE_VOCAB_SIZE, num_hidden_layers=num_layers, max_position_embeddings=512,
                       initializer_range=init_std, **shape, **specials)  # fmt: skip


def gaps(directory: Path) -> tuple[float, float]:
    """The largest (best - chosen) and |served - reference| over every token of the self-check's rows, bfloat16."""
    backbone = load_backbone(str(directory), "cpu", "bfloat16")
    engine = Engine(backbone, EngineConfig(device="cpu", dtype="bfloat16", kv_cache_bytes=32 << 20))
    rows = [
        row.on(input_ids) for input_ids in check_inputs(engine) for row in check_rows(Checks(engine), backbone.kind)
    ]
    outputs = run_through_engine(engine, rows)
    worst_choice = worst_logprob = 0.0
    for row in rows:
        tokens = [token for output in outputs[row.name] for token in output.tokens]
        reference = backbone.kind.reference_logprobs(backbone.model, row, [token.id for token in tokens])
        for token, expected in zip(tokens, reference, strict=True):
            chosen = float(expected[token.id])
            worst_choice = max(worst_choice, float(expected.max()) - chosen)
            worst_logprob = max(worst_logprob, abs(token.logprob - chosen))
    return worst_choice, worst_logprob


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bf16_tolerance", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 16, 32])
    parser.add_argument("--init-std", type=float, default=0.08)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args(argv)
    quiet_libraries()
    torch.set_num_threads(1)
    tolerance = tolerance_of(torch.bfloat16)
    print(f"bfloat16 on CPU against the uncached eager forward; the self-check's tolerance: {tolerance:g} nats")
    print(f"  {'layers':>6} {'seed':>4} {'best - chosen':>14} {'|served - reference|':>21}")
    with tempfile.TemporaryDirectory(prefix="promptserve-bf16-") as scratch:
        for num_layers in args.layers:
            for seed in range(args.seeds):
                config, directory = llama(num_layers, args.init_std), Path(scratch) / f"{num_layers}-{seed}"
                write_random_backbone(config, directory, seed=seed)
                choice, logprob = gaps(directory)
                print(f"  {num_layers:6d} {seed:4d} {choice:14.4f} {logprob:21.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
