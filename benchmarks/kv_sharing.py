"""KV bytes that 32 running rows of one task hold, over the ideal: the task's virtual tokens once, plus each row's own.

The engine keeps a task's virtual-token keys and values in shared pool blocks that every row of the task refers
to; rows own whole blocks, so each row's last block is partly empty. A server that copies the prefix into every
row (the engine before its KV pool, or PEFT's generate) holds rows x (virtual + own) instead.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from benchmarks.engine_runs import INTAKE, EngineRig, Recorder
from benchmarks.workload import PREFIX, random_text, write_task
from server.engine.intake import build_request
from server.engine.types import GenerateInput, SamplingParams


def kv_held_over_ideal(
    rig: EngineRig,
    backbone_dir: Path,
    root: Path,
    rng: random.Random,
    num_rows: int = 32,
    num_virtual_tokens: int = 128,
    input_chars: tuple[int, int] = (16, 96),
    num_new_tokens: int = 32,
) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    task_dir = write_task(
        AutoModelForCausalLM.from_pretrained(backbone_dir), PREFIX, num_virtual_tokens, root / "kv-task", seed=7
    )
    rig.store.register_dir("kv-shared", task_dir)
    rig.set_max_batch_size(num_rows)
    engine, memory, recorder = rig.engine, rig.engine.memory, Recorder()
    requests = []
    for i in range(num_rows):
        text = random_text(rng, rng.randint(*input_chars))
        params = SamplingParams(max_new_tokens=num_new_tokens)
        generate = GenerateInput(text, ("kv-shared",), None, params, request_id=f"kv-{i}")
        requests.append(build_request(generate, rig.backbone, rig.store, INTAKE, recorder.sink))
    for request in requests:
        engine.add(request)
    rows = [request.rows[0] for request in requests]
    while min(len(row.output_ids) for row in rows) < num_new_tokens // 2:  # every row mid-generation
        engine.step()
    task = memory.tasks[("kv-shared", 1)]
    token_bytes = rig.engine.pool.block_bytes // memory.block_size
    own_tokens = sum(row.num_computed for row in rows)
    held_blocks = len(task.block_ids) + sum(len(row.block_ids) for row in rows)
    ideal = (num_virtual_tokens + own_tokens) * token_bytes
    result = {
        "kv_held_bytes": held_blocks * memory.block_size * token_bytes,
        "ideal_bytes": ideal,
        "ratio": held_blocks * memory.block_size * token_bytes / ideal,
        "per_row_copies_over_ideal": (num_rows * num_virtual_tokens + own_tokens) * token_bytes / ideal,
        "task_refs": task.ref_count,
        "definition": (
            f"{num_rows} running rows of one prefix task with {num_virtual_tokens} virtual tokens, "
            f"{input_chars[0] + 1}-{input_chars[1] + 1} input tokens, measured after {num_new_tokens // 2} new "
            f"tokens each; held: the task's blocks plus every row's own blocks (block size {memory.block_size}); "
            "ideal: the virtual tokens once plus each row's own tokens"
        ),
    }
    while engine.has_work():
        engine.step()
    engine.retire_task("kv-shared", None)
    rig.store.delete("kv-shared")
    return result
