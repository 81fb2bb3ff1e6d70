"""How adapters are served today with PEFT: one PeftModel per method over a shared base, every task loaded with
`load_adapter`; per task, `set_adapter`, then its requests in one left-padded greedy `generate`.

PEFT cannot mix peft types in one PeftModel, so prompt-tuning tasks live in one wrapper and prefix-tuning
tasks in another; both wrap the same base model (the weights exist once). LoRA tasks all live in one wrapper, which
also offers PEFT's own mixed batch: one `generate` whose rows name their adapters (`adapter_names=`).

On an encoder-decoder backbone (the seq2seq presets: prompt tuning only) the base is an AutoModelForSeq2SeqLM and
PEFT's `generate` prepends the task's first P prompt rows to the encoder's input embeddings. Its inputs are padded on
the right, as T5's are, so padding never comes between the prompt and a row's text.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

from benchmarks.workload import LORA, PROMPT, TaskSpec, Workload
from server.engine import cpu_linears
from server.engine.config import CpuLinears
from server.engine.default_backbone import PAD_ID
from server.engine.reference import peft_generate_broken_reason

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class PeftRun:
    seconds: float
    cpu_seconds: float
    num_new_tokens: int
    token_ids: list[list[int]]  # per job, in workload order

    @property
    def tokens_per_s(self) -> float:
        return self.num_new_tokens / self.seconds

    @property
    def tokens_per_cpu_s(self) -> float:
        return self.num_new_tokens / self.cpu_seconds


class PeftServer:
    def __init__(
        self, backbone_dir: Path, tasks: list[TaskSpec], device: str, dtype: str, linears: CpuLinears = "torch"
    ) -> None:
        """`linears`: how the base model's linear layers run on the CPU (torch: as PEFT users run them; onednn: on
        the engine's CPU kernels, cpu_linears.py, the strongest PEFT)."""
        self.seq2seq = bool(getattr(AutoConfig.from_pretrained(backbone_dir), "is_encoder_decoder", False))
        broken = peft_generate_broken_reason()
        if self.seq2seq:
            # The cache renaming does not touch seq2seq prompt tuning: its generate hands the prompt to the encoder
            # as inputs_embeds and leaves the decoder's cache alone (tests/engine/test_seq2seq_reference.py).
            assert all(task.method == PROMPT for task in tasks), "seq2seq baseline: prompt tuning only"
        elif broken is not None and any(task.method != LORA for task in tasks):  # LoRA leaves the cache alone
            raise RuntimeError(f"{broken}: it would not be PEFT's real behaviour; `make bench` runs the benchmarks "
                               "with transformers 5.23.0, where it is right")  # fmt: skip
        self.device = torch.device(device)
        self.padding_side = "right" if self.seq2seq else "left"
        self.tokenizer = AutoTokenizer.from_pretrained(backbone_dir)
        auto = AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM
        base = auto.from_pretrained(backbone_dir, dtype=DTYPES[dtype]).to(self.device).eval()
        modules, head = dict(base.named_modules()), base.get_output_embeddings()
        layers = cpu_linears.shared_linears(modules, [name for name, module in modules.items() if module is not head])
        cpu_linears.install(layers, self.device, linears)  # before PEFT wraps them: its layers call these
        self.model_of = task_models(base, tasks, self.device)

    def run(self, workload: Workload) -> PeftRun:
        """Tasks one after another, in order of first appearance; each task's requests in one batch."""
        groups = rows_by_task(workload)
        encoded = {task_id: self.encode([workload.jobs[i].text for i in rows]) for task_id, rows in groups.items()}
        token_ids: list[list[int]] = [[] for _ in workload.jobs]
        started, cpu_started = time.perf_counter(), time.process_time()
        for task_id, rows in groups.items():
            max_new_tokens = workload.jobs[rows[0]].max_new_tokens
            assert all(workload.jobs[i].max_new_tokens == max_new_tokens for i in rows)
            generated = self.generate(task_id, encoded[task_id], max_new_tokens)
            for i, ids in zip(rows, generated, strict=True):
                token_ids[i] = ids
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        return PeftRun(seconds, cpu_seconds, sum(map(len, token_ids)), token_ids)

    def run_mixed(self, workload: Workload, batch_size: int) -> PeftRun:
        """PEFT's mixed LoRA batch: the requests in arrival order, `batch_size` at a time, each batch one
        left-padded `generate` that runs to its end, every row with its own adapter (`adapter_names=`)."""
        order = list(range(len(workload.jobs)))
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        encoded = [self.encode([workload.jobs[i].text for i in rows]) for rows in batches]
        token_ids: list[list[int]] = [[] for _ in workload.jobs]
        started, cpu_started = time.perf_counter(), time.process_time()
        for rows, inputs in zip(batches, encoded, strict=True):
            adapter_names = [str(workload.jobs[i].task_id) for i in rows]
            max_new_tokens = max(workload.jobs[i].max_new_tokens for i in rows)
            generated = self.generate_mixed(adapter_names, inputs, max_new_tokens)
            for i, ids in zip(rows, generated, strict=True):
                token_ids[i] = ids[: workload.jobs[i].max_new_tokens]
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        return PeftRun(seconds, cpu_seconds, sum(map(len, token_ids)), token_ids)

    @torch.inference_mode()
    def generate_mixed(
        self, adapter_names: list[str], encoded: dict[str, torch.Tensor], max_new_tokens: int
    ) -> list[list[int]]:
        model = self.model_of[adapter_names[0]]
        assert all(self.model_of[name] is model for name in adapter_names), "one PeftModel holds a mixed batch"
        out = model.generate(
            **encoded, adapter_names=adapter_names, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_ID
        )
        return out[:, encoded["input_ids"].shape[1] :].tolist()  # [B, new]

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side=self.padding_side)
        return {name: tensor.to(self.device) for name, tensor in encoded.items()}

    @torch.inference_mode()
    def generate(self, task_id: str, encoded: dict[str, torch.Tensor], max_new_tokens: int) -> list[list[int]]:
        model = self.model_of[task_id]
        model.set_adapter(task_id)
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD_ID)
        # a causal LM returns the input and the new tokens; a seq2seq LM the decoder start token and the new tokens
        width = 1 if self.seq2seq else encoded["input_ids"].shape[1]
        return out[:, width:].tolist()  # [B, new]


def task_models(base: torch.nn.Module, tasks: list[TaskSpec], device: torch.device) -> dict[str, PeftModel]:
    """As PEFT users serve many prompt adapters: one PeftModel per method over the shared base (PEFT cannot mix
    peft types in one model), `load_adapter` for each further task of that method. Task id -> its model."""
    model_of: dict[str, PeftModel] = {}
    wrappers: dict[str, PeftModel] = {}
    for task in tasks:
        model = wrappers.get(task.method)
        if model is None:
            model = PeftModel.from_pretrained(base, task.adapter_dir, adapter_name=task.task_id)
            wrappers[task.method] = model.to(device).eval()
        else:
            model.load_adapter(task.adapter_dir, adapter_name=task.task_id)
        model_of[task.task_id] = model
    return model_of


def rows_by_task(workload: Workload) -> dict[str, list[int]]:
    """Each task's requests (indices into the workload), tasks in order of first appearance."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, job in enumerate(workload.jobs):
        assert job.task_id is not None, "the PEFT baseline serves task requests only"
        groups[job.task_id].append(i)
    return groups
