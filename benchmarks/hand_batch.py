"""The strongest baseline a user can write by hand today, beside PEFT's `generate` per task: every static batch of
mixed-task rows in ONE padded greedy `generate` of the backbone itself.

Each task's virtual tokens come once from PEFT's public `get_prompt` (as the engine materialises a task once): a
prompt-tuning task's prompt embeddings go before its row's token embeddings (`generate(inputs_embeds=...)`); a
prefix task's keys and values go into its row's part of one `DynamicCache` for the whole batch (the per-row
prefixes stacked; a row without one, or with a shorter one, masks that part of the cache out). Rows are padded on
the left with an attention mask over cache and input, so `generate`'s position ids (the mask's running count) place
every row as PEFT's forward places it alone: a prompt's virtual tokens at 0..P-1, a prefix row's text from P on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from packaging.version import Version
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel

from benchmarks.peft_baseline import DTYPES, PeftRun
from benchmarks.workload import PREFIX, TaskSpec, Workload
from server.engine.default_backbone import PAD_ID

# transformers 5.24 renamed generate's cache argument (the benchmarks' own venv has 5.23, the project's 5.24)
CACHE_KWARG = "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


@dataclass(frozen=True, slots=True)
class Virtual:
    """One task's virtual tokens as the backbone reads them: prompt embeddings [P, H], or per layer a prefix's
    keys and values [kv_heads, P, head_dim]."""

    embeds: torch.Tensor | None = None
    keys: tuple[torch.Tensor, ...] = ()
    values: tuple[torch.Tensor, ...] = ()

    @property
    def num_prefix(self) -> int:
        return self.keys[0].shape[1] if self.keys else 0


class HandBatch:
    def __init__(self, backbone_dir: Path, tasks: list[TaskSpec], device: str, dtype: str) -> None:
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
        self.model = AutoModelForCausalLM.from_pretrained(backbone_dir, dtype=DTYPES[dtype]).to(self.device).eval()
        self.virtual = virtual_tokens(self.model, tasks)

    def run(self, workload: Workload, batch_size: int) -> PeftRun:
        """The requests in arrival order, `batch_size` at a time, each batch one `generate` to its longest row."""
        order = list(range(len(workload.jobs)))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        token_ids: list[list[int]] = [[] for _ in workload.jobs]
        started, cpu_started = time.perf_counter(), time.process_time()
        for rows in batches:
            jobs = [workload.jobs[i] for i in rows]
            generated = self.generate([job.text for job in jobs], [str(job.task_id) for job in jobs],
                                      max(job.max_new_tokens for job in jobs))  # fmt: skip
            for i, ids in zip(rows, generated, strict=True):
                token_ids[i] = ids[: workload.jobs[i].max_new_tokens]
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        return PeftRun(seconds, cpu_seconds, sum(map(len, token_ids)), token_ids)

    @torch.inference_mode()
    def generate(self, texts: list[str], task_ids: list[str], max_new_tokens: int) -> list[list[int]]:
        embed = self.model.get_input_embeddings()
        virtual = [self.virtual[task_id] for task_id in task_ids]
        rows = []
        for text, task in zip(texts, virtual, strict=True):
            ids = torch.tensor(self.tokenizer(text)["input_ids"], device=self.device)
            embeds = embed(ids)  # [T, H]
            rows.append(embeds if task.embeds is None else torch.cat([task.embeds, embeds]))  # [P + T, H]
        width, num_prefix = max(len(row) for row in rows), max(task.num_prefix for task in virtual)
        total = num_prefix + width  # generate reads inputs_embeds as covering the cache too: it drops the first
        inputs = torch.zeros(len(rows), total, rows[0].shape[-1], dtype=rows[0].dtype, device=self.device)
        mask = torch.zeros(len(rows), total, dtype=torch.long, device=self.device)  # [B, prefix + width]
        for i, (row, task) in enumerate(zip(rows, virtual, strict=True)):
            inputs[i, total - len(row) :] = row  # [B, prefix + width, H], padded on the left
            mask[i, num_prefix - task.num_prefix : num_prefix] = 1
            mask[i, total - len(row) :] = 1
        cache = {CACHE_KWARG: stacked_prefixes(virtual, num_prefix)} if num_prefix else {}
        out = self.model.generate(inputs_embeds=inputs, attention_mask=mask, **cache, max_new_tokens=max_new_tokens,
                                  do_sample=False, pad_token_id=PAD_ID)  # fmt: skip
        return out.tolist()  # [B, new]: from embeddings, generate returns the new tokens only


def stacked_prefixes(virtual: list[Virtual], num_prefix: int) -> DynamicCache:
    """One cache for the batch: row i's prefix keys and values at the end of its first `num_prefix` slots, zeros
    (masked out) elsewhere. Per layer [B, kv_heads, num_prefix, head_dim]."""
    sample = next(task for task in virtual if task.keys)
    layers = []
    for layer, (key, value) in enumerate(zip(sample.keys, sample.values, strict=True)):
        keys = key.new_zeros(len(virtual), key.shape[0], num_prefix, key.shape[2])
        values = value.new_zeros(len(virtual), value.shape[0], num_prefix, value.shape[2])
        for i, task in enumerate(virtual):
            if task.keys:
                keys[i, :, num_prefix - task.num_prefix :] = task.keys[layer]
                values[i, :, num_prefix - task.num_prefix :] = task.values[layer]
        layers.append((keys, values))
    return DynamicCache(layers)


@torch.inference_mode()
def virtual_tokens(base: PreTrainedModel, tasks: list[TaskSpec]) -> dict[str, Virtual]:
    """Each task's virtual tokens from PEFT's `get_prompt` (one PeftModel per method over the base, as PEFT loads
    them; prompt learning leaves the base's own modules untouched, so the base serves unwrapped afterwards)."""
    virtual: dict[str, Virtual] = {}
    wrappers: dict[str, PeftModel] = {}
    for task in tasks:
        model = wrappers.get(task.method)
        if model is None:
            model = wrappers[task.method] = PeftModel.from_pretrained(base, task.adapter_dir, adapter_name=task.task_id)
        else:
            model.load_adapter(task.adapter_dir, adapter_name=task.task_id)
        model.set_adapter(task.task_id)
        prompt = model.get_prompt(batch_size=1)
        if task.method == PREFIX:  # a DynamicCache of the prefix: per layer [1, kv_heads, P, head_dim]
            layers = prompt.layers
            virtual[task.task_id] = Virtual(keys=tuple(layer.keys[0] for layer in layers),
                                            values=tuple(layer.values[0] for layer in layers))  # fmt: skip
        else:
            virtual[task.task_id] = Virtual(embeds=prompt[0].to(base.dtype))  # [P, H]
    return virtual
