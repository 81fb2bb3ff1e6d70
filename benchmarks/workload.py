"""The benchmarks' synthetic world: a random Llama (GQA) backbone, PEFT-made tasks and requests.

The seq2seq presets swap in a random T5 v1.1 and PEFT `SEQ_2_SEQ_LM` prompt-tuning tasks (T5-style prompt tuning,
Lester et al. 2021); the workloads are the same. The classification presets swap in a random BERT-shaped encoder with
a sequence-classification head and PEFT `SEQ_CLS` tasks of three kinds (prompt tuning, P-tuning, prefix tuning as
P-Tuning v2 uses it on encoders); their requests are the same jobs, with nothing to generate.

The LoRA preset keeps the `cpu` Llama and writes PEFT `LORA` tasks of two ranks on two sets of target modules
(attention projections, MLP projections), beside prompt and prefix tasks for its mixed-kinds comparison.

Everything is written to disk and loaded back through `from_pretrained` / the task store, as in the tests.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model
from tokenizers import processors
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoModelForSequenceClassification,
    BertConfig,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    T5Config,
)

from server.engine.default_backbone import (
    BOS_ID,
    BYTE_VOCAB_SIZE,
    EOS_ID,
    PAD_ID,
    byte_tokenizer,
    write_random_backbone,
)

PROMPT, PREFIX = "prompt_tuning", "prefix_tuning"
P_TUNING = "p_tuning"  # PEFT's PromptEncoder (an MLP over the virtual tokens; the saved task holds its output)
LORA = "lora"

# Llama shapes with grouped-query attention (4 query heads per KV head). The vocabulary is the byte tokenizer's
# 259 ids, so the LM head is cheap next to a real model's; the layers are what is measured.
PRESETS: dict[str, dict[str, int]] = {
    # ~22M parameters: a decode step takes ~10-30 ms on one CPU core, so a comparison runs in seconds.
    "cpu": {"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 8, "num_attention_heads": 8},
    # ~4M parameters: per-step overhead outweighs the arithmetic, so cost grows slowly with the batch (GPU-like).
    "cpu-small": {"hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 6, "num_attention_heads": 8},
    # ~1B parameters (TinyLlama's layers): for a GPU.
    "gpu": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32},
}

# T5 v1.1 shapes (gated GELU, as Flan-T5 and the LM-adapted T5 of Lester et al.'s prompt tuning), same byte vocabulary.
SEQ2SEQ_PRESETS: dict[str, dict[str, int]] = {
    # ~25M parameters (6 encoder + 6 decoder layers), near the `cpu` Llama: the full run takes about 4 minutes.
    "cpu-t5": {"d_model": 384, "d_kv": 64, "d_ff": 1024, "num_layers": 6, "num_decoder_layers": 6, "num_heads": 6},
}


# BERT shapes (learned absolute positions, 512 of them), same byte vocabulary, three labels.
CLASSIFY_PRESETS: dict[str, dict[str, int]] = {
    # ~11M parameters: the layers of MiniLM-L6-H384 (all-MiniLM-L6-v2, a common small encoder to fine-tune).
    "cpu-classify": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 1536},
}
CLASSIFY_METHODS = (PROMPT, P_TUNING, PREFIX)
NUM_LABELS = 3

# The LoRA preset's backbone is the `cpu` Llama; its tasks adapt the attention or the MLP projections.
LORA_PRESETS = {"cpu-lora": "cpu"}
LORA_TARGETS = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}


def is_lora(preset: str) -> bool:
    return preset in LORA_PRESETS


def is_seq2seq(preset: str) -> bool:
    return preset in SEQ2SEQ_PRESETS


def is_classify(preset: str) -> bool:
    return preset in CLASSIFY_PRESETS


def backbone_config(preset: str) -> LlamaConfig | T5Config:
    if is_seq2seq(preset):
        return t5_config(preset)
    shape = PRESETS[LORA_PRESETS.get(preset, preset)]
    return LlamaConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        num_key_value_heads=shape["num_attention_heads"] // 4,
        max_position_embeddings=4096,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
        **shape,
    )


def t5_config(preset: str) -> T5Config:
    """T5's conventions: decoding starts at <pad>. `tie_word_embeddings=False` as in Flan-T5's config (transformers
    still ties the head to the shared embedding; it only drops the d_model**-0.5 scaling of the decoder's output).
    """
    return T5Config(
        vocab_size=BYTE_VOCAB_SIZE,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        initializer_factor=2.0,  # with the default 1.0 a random T5 answers <pad> forever: the outputs would all match
        **SEQ2SEQ_PRESETS[preset],
    )


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer as T5's: no <s>, </s> after the input (so still one token per character, plus one)."""
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
    )
    return tokenizer


def encoder_config(preset: str) -> BertConfig:
    """`initializer_range` 0.2: with BERT's 0.02 a random encoder's outputs barely depend on the input, so the
    probabilities compared with PEFT's would agree for any input."""
    return BertConfig(
        vocab_size=BYTE_VOCAB_SIZE,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        num_labels=NUM_LABELS,
        initializer_range=0.2,
        **CLASSIFY_PRESETS[preset],
    )


def encoder_tokenizer() -> PreTrainedTokenizerFast:
    """The byte tokenizer as an encoder's: `<s> text </s>` (<s> plays [CLS], </s> [SEP]), one token per character."""
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>", special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)]
    )
    tokenizer.cls_token, tokenizer.sep_token = "<s>", "</s>"
    return tokenizer


def write_encoder_backbone(preset: str, directory: Path, seed: int = 0) -> Path:
    """A seeded random `AutoModelForSequenceClassification` and its tokenizer, loadable by `from_pretrained`."""
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(encoder_config(preset))
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(directory)
    encoder_tokenizer().save_pretrained(directory)
    return directory


def write_backbone(preset: str, directory: Path, seed: int = 0) -> Path:
    """Random weights, except that </s> can never win: every request then runs to its max_new_tokens.

    The EOS row of the LM head is zeroed (its logit is exactly 0 while 258 random logits compete), so output
    lengths are fixed by the workload, for the engine and for PEFT alike, without touching either's stopping rule.
    T5's head is its shared embedding, so there </s> at the end of every input also embeds to zeros.
    """
    if is_seq2seq(preset):
        write_random_backbone(t5_config(preset), directory, seed=seed, tokenizer=t5_tokenizer())
        model = AutoModelForSeq2SeqLM.from_pretrained(directory)
    else:
        write_random_backbone(backbone_config(preset), directory, seed=seed)
        model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS_ID].zero_()
    model.save_pretrained(directory)
    return directory


@dataclass(frozen=True, slots=True)
class TaskSpec:
    task_id: str
    method: str  # PROMPT | PREFIX (| P_TUNING on the classification presets, LORA on the LoRA preset)
    num_virtual_tokens: int  # 0 for LoRA
    adapter_dir: Path
    shape: str = ""  # LoRA: its rank and targets ("r8-attention"); tasks of one shape cost the same arithmetic


def peft_config(
    method: str, num_virtual_tokens: int, task_type: str = "CAUSAL_LM"
) -> PromptTuningConfig | PromptEncoderConfig | PrefixTuningConfig:
    common = {"task_type": task_type, "num_virtual_tokens": num_virtual_tokens}
    if method == P_TUNING:
        return PromptEncoderConfig(**common, encoder_hidden_size=128)  # PEFT's P-tuning guide uses 128
    return PromptTuningConfig(**common) if method == PROMPT else PrefixTuningConfig(**common)


def task_type_of(base: PreTrainedModel) -> str:
    if base.config.is_encoder_decoder:
        return "SEQ_2_SEQ_LM"
    return "SEQ_CLS" if isinstance(base.config, BertConfig) else "CAUSAL_LM"


def write_task(base: PreTrainedModel, method: str, num_virtual_tokens: int, out_dir: Path, seed: int) -> Path:
    """A task as users bring it: PEFT's get_peft_model(...).save_pretrained, with random trained weights.

    Prompt learning leaves the base model's weights alone, so one loaded base serves every task's creation.
    On a T5 base the task is `SEQ_2_SEQ_LM`: PEFT saves 2P prompt rows and puts the first P before the encoder input.
    On an encoder it is `SEQ_CLS`: PEFT also trains and saves its own copy of the classifier (`modules_to_save`).
    """
    torch.manual_seed(seed)
    model = get_peft_model(base, peft_config(method, num_virtual_tokens, task_type_of(base)))
    with torch.no_grad():
        for param in model.prompt_encoder.parameters():
            param.normal_(0.0, 1.0)
        for name, param in model.named_parameters():
            if ".modules_to_save." in name:  # the task's classifier
                param.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


def write_tasks(
    backbone_dir: Path, root: Path, num_tasks: int, num_virtual_tokens: int, prefix: str = "", seq2seq: bool = False
) -> list[TaskSpec]:
    """Half prompt tuning, half prefix tuning, alternating; every task has the same number of virtual tokens.

    `seq2seq`: all prompt tuning, on an encoder-decoder backbone (T5-style prompt tuning). PEFT 0.21.2's seq2seq
    `generate` loses a prefix on transformers 5.24 (tests/seq2seq_fixtures.py): prefix tasks would have no baseline.
    """
    base = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(backbone_dir)
    methods = (PROMPT,) if seq2seq else (PROMPT, PREFIX)
    tasks = []
    for i in range(num_tasks):
        method = methods[i % len(methods)]
        task_id = f"{prefix}{method.split('_')[0]}-{i:03d}"
        adapter_dir = write_task(base, method, num_virtual_tokens, root / task_id, seed=1000 + i)
        tasks.append(TaskSpec(task_id, method, num_virtual_tokens, adapter_dir))
    return tasks


def write_lora_task(backbone_dir: Path, rank: int, targets: str, out_dir: Path, seed: int) -> Path:
    """A LoRA task as users bring it: `get_peft_model(...).save_pretrained`, with random trained weights.

    A and B are drawn so that the delta moves the logits about as much as training would (B is zero at PEFT's
    initialisation: the task would be the backbone). The base is loaded afresh: PEFT injects LoRA into it in place.
    """
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(backbone_dir)
    config = LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS[targets]))
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_A." in name:
                param.normal_(0.0, param.shape[1] ** -0.5)  # [r, in]: unit-variance projections
            elif ".lora_B." in name:
                param.normal_(0.0, 0.05 * param.shape[1] ** -0.5)  # [out, r]
    model.save_pretrained(out_dir)
    return out_dir


def write_lora_tasks(
    backbone_dir: Path, root: Path, num_tasks: int, ranks: tuple[int, ...], prefix: str = "lora"
) -> list[TaskSpec]:
    """Tasks cycling through every (rank, targets) pair: rank 8 on the attention projections, rank 8 on the MLP's,
    rank 16 on each, and again."""
    shapes = [(rank, targets) for rank in ranks for targets in LORA_TARGETS]
    tasks = []
    for i in range(num_tasks):
        rank, targets = shapes[i % len(shapes)]
        task_id = f"{prefix}-{i:03d}"
        adapter_dir = write_lora_task(backbone_dir, rank, targets, root / task_id, seed=2000 + i)
        tasks.append(TaskSpec(task_id, LORA, 0, adapter_dir, shape=f"r{rank}-{targets}"))
    return tasks


def write_classify_tasks(backbone_dir: Path, root: Path, num_tasks: int, num_virtual_tokens: int) -> list[TaskSpec]:
    """`SEQ_CLS` tasks cycling through prompt tuning, P-tuning and prefix tuning, each with its own classifier.

    Each task starts from a freshly loaded base: `get_peft_model` wraps the base's classifier in place."""
    tasks = []
    for i in range(num_tasks):
        method = CLASSIFY_METHODS[i % len(CLASSIFY_METHODS)]
        task_id = f"{method.replace('_tuning', '').replace('_', '')}-{i:03d}"  # prompt-000, ptuning-001, prefix-002
        base = AutoModelForSequenceClassification.from_pretrained(backbone_dir)
        adapter_dir = write_task(base, method, num_virtual_tokens, root / task_id, seed=1000 + i)
        tasks.append(TaskSpec(task_id, method, num_virtual_tokens, adapter_dir))
    return tasks


@dataclass(frozen=True, slots=True)
class Job:
    """One request of a workload: its text, its task (None: the bare backbone) and when it arrives."""

    text: str
    task_id: str | None
    max_new_tokens: int
    arrival_s: float = 0.0  # offset from the start of the run


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    jobs: list[Job]
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def num_new_tokens(self) -> int:
        return sum(job.max_new_tokens for job in self.jobs)


def random_text(rng: random.Random, num_chars: int) -> str:
    """ASCII text: the byte tokenizer gives one token per character (plus <s>)."""
    alphabet = string.ascii_letters + string.digits + " .,"
    return "".join(rng.choice(alphabet) for _ in range(num_chars))


def input_lengths(rng: random.Random, num: int, low: int, high: int) -> list[int]:
    return [rng.randint(low, high) for _ in range(num)]


def poisson_arrivals(rng: random.Random, num: int, rate: float) -> list[float]:
    """Arrival offsets (seconds) of a Poisson process with `rate` requests per second; the first at 0."""
    offsets, now = [], 0.0
    for _ in range(num):
        offsets.append(now)
        now += rng.expovariate(rate)
    return offsets


def with_tasks(workload: Workload, task_of: dict[str | None, str | None], name: str) -> Workload:
    """The same jobs, each task id mapped through `task_of`."""
    jobs = [Job(job.text, task_of[job.task_id], job.max_new_tokens, job.arrival_s) for job in workload.jobs]
    return Workload(name, jobs, dict(workload.notes))


# ---- the workloads of the comparisons


def round_robin_workload(
    rng: random.Random, tasks: list[TaskSpec], per_task: int, input_chars: tuple[int, int], new_tokens: int
) -> Workload:
    """Requests cycling through the tasks: any `len(tasks)` consecutive requests use every task once."""
    lengths = input_lengths(rng, len(tasks) * per_task, *input_chars)
    jobs = [Job(random_text(rng, n), tasks[i % len(tasks)].task_id, new_tokens) for i, n in enumerate(lengths)]
    return Workload("mixed", jobs)


def methods_of(tasks: list[TaskSpec]) -> list[str]:
    """The tasks' methods, in order of first appearance."""
    return list(dict.fromkeys(t.method for t in tasks))


def task_mix(tasks: list[TaskSpec]) -> str:
    """E.g. '8 prompt tuning + 8 prefix tuning'."""
    return " + ".join(
        f"{sum(t.method == method for t in tasks)} {method.replace('_', ' ')}" for method in methods_of(tasks)
    )


def one_task_per_method(workload: Workload, tasks: list[TaskSpec]) -> Workload:
    """The same requests, each on the first task of its own method: same rows, methods and virtual tokens.

    With one method (the seq2seq presets' prompt tuning) that is one task for every request."""
    return one_task_per_group(workload, tasks, kind_of=lambda task: task.method)


def kind_of_task(task: TaskSpec) -> str:
    """What a task costs to run: its method, and a LoRA task's rank and targets."""
    return f"{task.method} {task.shape}" if task.shape else task.method


def one_task_per_group(workload: Workload, tasks: list[TaskSpec], kind_of: Callable[[TaskSpec], str]) -> Workload:
    """The same requests, each on the first task of its own kind (`kind_of`): the same rows and arithmetic, and
    only the number of distinct tasks differs."""
    first_of: dict[str, str] = {}
    for task in tasks:
        first_of.setdefault(kind_of(task), task.task_id)
    return with_tasks(workload, {t.task_id: first_of[kind_of(t)] for t in tasks}, "uniform")


def shuffled_workload(
    rng: random.Random, tasks: list[TaskSpec], per_task: int, input_chars: tuple[int, int], new_tokens: int
) -> Workload:
    """`per_task` requests for every task (uniform popularity), in random order."""
    task_ids = [t.task_id for t in tasks for _ in range(per_task)]
    rng.shuffle(task_ids)
    lengths = input_lengths(rng, len(task_ids), *input_chars)
    jobs = [Job(random_text(rng, n), task_id, new_tokens) for task_id, n in zip(task_ids, lengths, strict=True)]
    return Workload("shuffled", jobs)


def varied_output_workload(
    rng: random.Random, tasks: list[TaskSpec], num: int, input_chars: tuple[int, int], new_tokens: tuple[int, int]
) -> Workload:
    """Tasks drawn uniformly, output lengths uniform in `new_tokens`; everything arrives at t=0."""
    lengths = input_lengths(rng, num, *input_chars)
    news = input_lengths(rng, num, *new_tokens)
    jobs = [Job(random_text(rng, c), rng.choice(tasks).task_id, n) for c, n in zip(lengths, news, strict=True)]
    return Workload("varied", jobs)


def with_arrivals(workload: Workload, arrivals: list[float]) -> Workload:
    jobs = [Job(job.text, job.task_id, job.max_new_tokens, t) for job, t in zip(workload.jobs, arrivals, strict=True)]
    return Workload(workload.name, jobs, dict(workload.notes))


@dataclass(slots=True)
class InputsTimed:
    """A classification run's inputs and its wall and CPU seconds (the engine's and PEFT's records extend it)."""

    seconds: float
    cpu_seconds: float
    num_inputs: int

    @property
    def inputs_per_s(self) -> float:
        return self.num_inputs / self.seconds

    @property
    def inputs_per_cpu_s(self) -> float:
        return self.num_inputs / self.cpu_seconds
