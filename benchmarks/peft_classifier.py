"""How prompt-learning classifiers are served today with PEFT: one PeftModel per method over a shared
`AutoModelForSequenceClassification`, every task loaded with `load_adapter`; per task, `set_adapter`, then its
inputs in one right-padded forward.

PEFT cannot mix peft types in one PeftModel, so prompt-tuning, P-tuning and prefix-tuning tasks live in three
wrappers over the same base (the weights exist once); each task's classifier is its own `modules_to_save` copy,
which `set_adapter` switches to.

Prefix tasks: PEFT 0.21.2's `_prefix_tuning_forward` raises "Model does not support past key values" on
transformers 5.23 and 5.24 (it looks for a `past_key_values` parameter that the sequence-classification heads no
longer name), so this runs what it would run: the head model with the mask extended by P ones and the task's
prefix from `get_prompt` as the encoder's cache (`cache` on 5.24, `past_key_values` before).
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from benchmarks.peft_baseline import DTYPES, rows_by_task, task_models
from benchmarks.workload import InputsTimed, TaskSpec, Workload


@dataclass(slots=True)
class PeftClassifyRun(InputsTimed):
    num_tokens: int  # positions the batches computed: padding and prompt kinds' virtual tokens included
    probs: list[torch.Tensor]  # per job, in workload order: [labels], on the CPU


class PeftClassifier:
    padding_side = "right"

    def __init__(self, backbone_dir: Path, tasks: list[TaskSpec], device: str, dtype: str) -> None:
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
        base = AutoModelForSequenceClassification.from_pretrained(backbone_dir, dtype=DTYPES[dtype])
        base = base.to(self.device).eval()
        encoder_params = inspect.signature(base.base_model.forward).parameters
        self.cache_name = "cache" if "cache" in encoder_params else "past_key_values"  # renamed in transformers 5.24
        self.model_of = task_models(base, tasks, self.device)

    def run(self, workload: Workload) -> PeftClassifyRun:
        """Tasks one after another, in order of first appearance; each task's inputs in one batch."""
        groups = rows_by_task(workload)
        encoded = {task_id: self.encode([workload.jobs[i].text for i in rows]) for task_id, rows in groups.items()}
        probs: list[torch.Tensor] = [torch.empty(0)] * len(workload.jobs)
        started, cpu_started = time.perf_counter(), time.process_time()
        for task_id, rows in groups.items():
            group_probs = self.classify(task_id, encoded[task_id])
            for i, row_probs in zip(rows, group_probs, strict=True):
                probs[i] = row_probs
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        num_tokens = sum(self.num_positions(task_id, batch["input_ids"]) for task_id, batch in encoded.items())
        return PeftClassifyRun(seconds, cpu_seconds, len(workload.jobs), num_tokens, probs)

    def num_positions(self, task_id: str, input_ids: torch.Tensor) -> int:
        """A batch's computed positions: prompt kinds put their virtual tokens in every row; a prefix is keys only."""
        config = self.model_of[task_id].peft_config[task_id]
        num_virtual = 0 if config.peft_type.value == "PREFIX_TUNING" else config.num_virtual_tokens
        return input_ids.shape[0] * (num_virtual + input_ids.shape[1])

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=self.padding_side)
        return {name: encoded[name].to(self.device) for name in ("input_ids", "attention_mask")}

    @torch.inference_mode()
    def classify(self, task_id: str, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        model = self.model_of[task_id]
        model.set_adapter(task_id)
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
        config = model.active_peft_config
        if config.peft_type.value != "PREFIX_TUNING":
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        else:
            batch = input_ids.shape[0]
            prefix_mask = attention_mask.new_ones(batch, config.num_virtual_tokens)
            mask = torch.cat([prefix_mask, attention_mask], dim=1)  # [B, P+T]
            prefix = {self.cache_name: model.get_prompt(batch)}
            logits = model.base_model(input_ids=input_ids, attention_mask=mask, **prefix).logits
        return torch.softmax(logits.float(), dim=-1).cpu()  # [B, labels]
