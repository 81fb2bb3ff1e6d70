"""LoRA and IA3 tasks in the engine (issue 27): every row's tokens and log-probabilities equal PEFT's own forward for
its adapter alone (over the whole sequence, no cache), and PEFT's `adapter_names=` mixed batch where PEFT has one,
whether the row runs alone or mixed with rows of other LoRA / IA3 tasks, prompt, P-tuning and prefix tasks and the
bare backbone, joins mid-flight, is prefilled in chunks or is preempted (the four harness variants)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from server.engine import adapters
from server.engine.kv_pool import HOST
from server.engine.types import EnsembleMode
from tests.engine.harness import Harness, token_ids
from tests.fixtures import EOS_ID, TinyBackbone
from tests.lora_fixtures import write_module_adapter
from tests.reference import greedy_with_logprobs, peft_model

TEXTS = ("hello world", "the quick brown fox", "adapters in one batch", "xyz")
ADAPTERS: dict[str, dict[str, dict[str, Any]]] = {
    "llama": {
        "lora-a": {"method": "lora", "target_modules": ["q_proj", "v_proj", "down_proj"], "r": 4,
                   "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 4}},
        "lora-b": {"method": "lora", "target_modules": r".*\.(k_proj|o_proj|up_proj)", "r": 8, "use_rslora": True},
        "lora-one-layer": {"method": "lora", "target_modules": ["gate_proj", "q_proj"], "layers_to_transform": [1]},
        "ia3": {"method": "ia3", "target_modules": ["k_proj", "v_proj", "down_proj"],
                "feedforward_modules": ["down_proj"]},
    },
    "gpt2": {
        "lora-a": {"method": "lora", "target_modules": ["c_attn", "c_fc"], "fan_in_fan_out": True},
        "lora-b": {"method": "lora", "target_modules": ["c_proj"], "fan_in_fan_out": True, "r": 2, "lora_alpha": 5},
        "lora-one-layer": {"method": "lora", "target_modules": ["c_attn", "c_fc"], "layers_to_transform": 0,
                           "fan_in_fan_out": True, "r": 8, "lora_alpha": 24},
        "ia3": {"method": "ia3", "target_modules": ["c_attn", "mlp.c_proj"], "feedforward_modules": ["mlp.c_proj"],
                "fan_in_fan_out": True},
    },
}  # fmt: skip
LORA_TASKS = ("lora-a", "lora-b", "lora-one-layer")
MODULE_TASKS = (*LORA_TASKS, "ia3")


@pytest.fixture(scope="module")
def module_adapters(tiny_backbone: TinyBackbone, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp(f"module-adapters-{tiny_backbone.arch}")
    return {
        name: write_module_adapter(
            tiny_backbone.path,
            settings["method"],
            root / name,
            seed=seed,
            **{k: v for k, v in settings.items() if k != "method"},
        )
        for seed, (name, settings) in enumerate(ADAPTERS[tiny_backbone.arch].items())
    }


@pytest.fixture
def served(harness: Harness, module_adapters: dict[str, Path]) -> Harness:
    for name, directory in module_adapters.items():
        harness.store.register_dir(name, directory)
    return harness


@pytest.fixture(scope="module")
def references(tiny_backbone: TinyBackbone, module_adapters: dict[str, Path]) -> dict[tuple[str | None, str], Any]:
    """(task, text) -> PEFT's greedy tokens and log-probabilities for that adapter alone, without a cache."""
    eos = {EOS_ID}
    expected = {}
    tokenizer = Harness.tokenizer_of(tiny_backbone)
    for task in (*MODULE_TASKS, None, "prefix", "prompt_tuning"):
        if task in module_adapters:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_backbone.path),
                                              module_adapters[task]).eval()  # fmt: skip
        else:
            model = peft_model(tiny_backbone, task)
        for text in TEXTS:
            expected[(task, text)] = greedy_with_logprobs(model, tokenizer(text)["input_ids"], 8, eos)
    return expected


def check(completion: Any, reference: tuple[list[int], list[float]]) -> None:
    tokens, logprobs = reference
    assert token_ids(completion) == tokens
    served = torch.tensor([token.logprob for token in completion.tokens])
    torch.testing.assert_close(served, torch.tensor(logprobs), rtol=0, atol=1e-4)


def test_the_test_adapters_change_the_answers(references: dict[tuple[str | None, str], Any]) -> None:
    """Each adapter's log-probabilities differ from the bare backbone's, and most of its tokens: a bug that dropped
    its delta would fail the tests below."""
    for task in MODULE_TASKS:
        bare = [references[(None, text)] for text in TEXTS]
        adapted = [references[(task, text)] for text in TEXTS]
        assert sum(a[0] != b[0] for a, b in zip(adapted, bare, strict=True)) >= len(TEXTS) - 1, task
        assert all(abs(a[1][0] - b[1][0]) > 1e-2 for a, b in zip(adapted, bare, strict=True)), task


@pytest.mark.parametrize("task", MODULE_TASKS)
def test_a_row_alone_equals_peft_forward(served: Harness, references: dict, task: str) -> None:
    for text in TEXTS[:2]:
        check(served.alone(text, task, max_new_tokens=8), references[(task, text)])


def test_every_kind_mixed_in_one_batch_equals_each_alone(served: Harness, references: dict) -> None:
    tasks: list[str | None] = [*MODULE_TASKS, "prefix", "prompt_tuning", None]
    requests = [served.request(TEXTS[i % len(TEXTS)], task, max_new_tokens=8) for i, task in enumerate(tasks)]
    for i, (task, completion) in enumerate(zip(tasks, served.run(*requests), strict=True)):
        check(completion, references[(task, TEXTS[i % len(TEXTS)])])
    assert served.is_idle() and not served.engine.tasks.adapters.slots.holds


def test_stacked_weights_count_in_the_pool_while_their_rows_run_and_go_with_them(served: Harness) -> None:
    """A mixed step's stacked copies of its tasks' weights are in the pool's bytes while the rows run; once the rows
    finish the pool holds the weights alone."""
    for task in MODULE_TASKS:
        served.engine.add(served.request(TEXTS[0], task, max_new_tokens=4))
    cache, hooks = served.engine.tasks, served.engine.tasks.adapters.hooks
    while not hooks.stacks:  # until a step mixes tasks (a chunked prefill takes one row at a time first)
        served.step()
    weights = sum(adapter.nbytes for adapter in cache.adapters.resident.values())
    assert hooks.stacked_bytes > 0 and cache.stats().adapter_bytes == weights + hooks.stacked_bytes
    served.run()
    weights = sum(adapter.nbytes for adapter in cache.adapters.resident.values())
    assert hooks.stacks == {} and cache.stats().adapter_bytes == weights


def test_rows_joining_mid_flight_equal_peft(served: Harness, references: dict) -> None:
    first = [served.request(TEXTS[0], "lora-a", max_new_tokens=8), served.request(TEXTS[1], None, max_new_tokens=8)]
    later = {
        2: [served.request(TEXTS[2], "ia3", max_new_tokens=8)],
        4: [served.request(TEXTS[3], "lora-b", max_new_tokens=8), served.request(TEXTS[0], "prefix", max_new_tokens=8)],
    }
    completions = served.run(*first, later=later)
    expected = [("lora-a", TEXTS[0]), (None, TEXTS[1]), ("ia3", TEXTS[2]), ("lora-b", TEXTS[3]), ("prefix", TEXTS[0])]
    for completion, key in zip(completions, expected, strict=True):
        check(completion, references[key])


def test_an_ensemble_mixes_lora_and_prompt_tasks(served: Harness, references: dict) -> None:
    request = served.request(TEXTS[1], "lora-a", "prefix", "ia3", ensemble=EnsembleMode.VOTE, max_new_tokens=8)
    completion = served.run(request)[0]
    assert completion.members is not None
    tokenizer = served.backbone.tokenizer
    expected = [
        tokenizer.decode(references[(task, TEXTS[1])][0], skip_special_tokens=True)
        for task in ("lora-a", "prefix", "ia3")
    ]
    assert [member.generated_text for member in completion.members] == expected


@torch.inference_mode()
def test_peft_mixed_batch_agrees(
    tiny_backbone: TinyBackbone, module_adapters: dict[str, Path], served: Harness
) -> None:
    """PEFT's own mixed batch (`adapter_names=`, LoRA only): one forward over rows of different adapters and the
    bare backbone; each row's last-token log-probabilities equal the engine's first generated token's."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_backbone.path),
                                      module_adapters[LORA_TASKS[0]], adapter_name=LORA_TASKS[0]).eval()  # fmt: skip
    for name in LORA_TASKS[1:]:
        model.load_adapter(module_adapters[name], adapter_name=name)
    names = [*LORA_TASKS, "__base__"]
    ids = torch.tensor([Harness.tokenizer_of(tiny_backbone)(TEXTS[1])["input_ids"]] * len(names))
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names).logits[:, -1]
    expected = logits.float().log_softmax(-1)
    completions = served.run(
        *[served.request(TEXTS[1], n if n != "__base__" else None, max_new_tokens=1) for n in names]
    )
    for row, completion in zip(expected, completions, strict=True):
        token = completion.tokens[0]
        assert token.id == int(row.argmax())
        assert abs(token.logprob - float(row.max())) < 1e-4


def test_max_loras_makes_rows_of_other_tasks_wait_and_answers_stay_exact(
    tiny_backbone: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path], references: dict
) -> None:
    harness = Harness(tiny_backbone, tmp_path / "store", max_loras=1, adapter_cache_bytes=1)
    for name, directory in module_adapters.items():
        harness.store.register_dir(name, directory)
    requests = [harness.request(TEXTS[0], task, max_new_tokens=8) for task in MODULE_TASKS]
    harness.engine.add(requests[0])
    harness.engine.add(requests[1])
    harness.step()
    assert [r.status.name for r in requests[:2]] == ["RUNNING", "WAITING"]  # one LoRA task held at a time
    for request in requests[2:]:
        harness.engine.add(request)
    harness.run()
    for task, request in zip(MODULE_TASKS, requests, strict=True):
        check(harness.completion(request.request_id), references[(task, TEXTS[0])])
    stats = harness.engine.tasks.stats()
    assert stats.num_adapters == 1 and stats.evictions >= len(MODULE_TASKS) - 1 and stats.num_pinned == 0


def test_a_replaced_lora_task_serves_its_new_version(
    served: Harness, module_adapters: dict[str, Path], references: dict
) -> None:
    check(served.alone(TEXTS[0], "lora-a", max_new_tokens=8), references[("lora-a", TEXTS[0])])
    served.store.register_dir("lora-a", module_adapters["lora-b"])
    served.engine.retire_task("lora-a", 2)  # what the server does when the store announces version 2
    assert ("lora-a", 1) not in served.engine.tasks.adapters.resident
    check(served.alone(TEXTS[0], "lora-a", max_new_tokens=8), references[("lora-b", TEXTS[0])])
    assert list(served.engine.tasks.adapters.resident) == [("lora-a", 2)]


def test_an_ensemble_of_more_lora_tasks_than_max_loras_is_refused(
    tiny_backbone: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path]
) -> None:
    harness = Harness(tiny_backbone, tmp_path / "store", max_loras=1)
    for name, directory in module_adapters.items():
        harness.store.register_dir(name, directory)
    request = harness.request(TEXTS[0], "lora-a", "lora-b", ensemble=EnsembleMode.VOTE, max_new_tokens=4)
    harness.engine.add(request)
    error = harness.outputs[request.request_id][-1].error
    assert error is not None and "applies 2 LoRA / IA3 tasks; max_loras is 1" in str(error)


def test_a_batch_that_ends_as_the_next_of_the_same_tasks_starts_copies_their_weights_once(
    tiny_backbone: TinyBackbone, tmp_path: Path, module_adapters: dict[str, Path], references: dict,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Two rows at a time: the first two requests end in the same step and the next two, of the same tasks, start
    in the one after; the stacks' places are released after admission, so each task is copied into each of its
    modules' stacks once (and the stacks go when the engine is idle)."""
    from server.engine.adapters import LoraStack

    copies: list[tuple[int, int]] = []
    place = LoraStack.place

    def counted(stack: LoraStack, name: str, task: Any) -> int:
        if id(task) not in stack.places:
            copies.append((id(stack), id(task)))
        return place(stack, name, task)

    monkeypatch.setattr(LoraStack, "place", counted)
    harness = Harness(tiny_backbone, tmp_path / "store", max_batch_size=2)
    for name, directory in module_adapters.items():
        harness.store.register_dir(name, directory)
    tasks = ["lora-a", "lora-b", "lora-a", "lora-b"]
    completions = harness.run(*[harness.request(TEXTS[0], task, max_new_tokens=8) for task in tasks])
    for task, completion in zip(tasks, completions, strict=True):
        check(completion, references[(task, TEXTS[0])])
    assert copies and len(copies) == len(set(copies)), "a task copied into a stack again"
    assert harness.engine.tasks.adapters.hooks.stacks == {}


def test_stacked_weights_go_when_the_last_rows_are_aborted(served: Harness) -> None:
    """A client that leaves mid-generation aborts its request between steps; when that leaves the engine idle no
    step follows, so the abort itself releases the stacks: the pool holds the weights alone."""
    requests = [served.request(TEXTS[0], task, max_new_tokens=32) for task in MODULE_TASKS]
    for request in requests:
        served.engine.add(request)
    cache, hooks = served.engine.tasks, served.engine.tasks.adapters.hooks
    while not hooks.stacks:
        served.step()
    for request in requests:
        served.engine.abort(request.request_id)
    assert not served.engine.has_work()
    weights = sum(adapter.nbytes for adapter in cache.adapters.resident.values())
    assert hooks.stacks == {} and hooks.tables == {} and cache.stats().adapter_bytes == weights


def test_a_matmul_pair_per_group_equals_grouped_mm() -> None:
    """Where `grouped_mm` would read its group bounds back from a GPU (outside bfloat16 on Hopper and Blackwell), the
    engine multiplies group by group at the bounds it knows on the host: the same deltas, an empty group too."""
    generator = torch.Generator().manual_seed(0)
    inputs, lora_a, lora_b = (torch.randn(*shape, generator=generator) for shape in ((9, 16), (3, 16, 4), (3, 4, 8)))
    ends = [5, 5, 9]
    offsets = torch.tensor(ends, dtype=torch.int32, device=HOST)
    expected = F.grouped_mm(F.grouped_mm(inputs, lora_a, offs=offsets), lora_b, offs=offsets)
    torch.testing.assert_close(adapters.mm_by_group(inputs, lora_a, lora_b, ends), expected)


def test_rows_of_uneven_tasks_equal_peft_through_a_matmul_pair_per_group(
    tiny_backbone: TinyBackbone, tmp_path: Path, references: dict, module_adapters: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """Ten rows of one LoRA task and one of each of two others on the same modules (their decode tokens too uneven
    to pad): through the matmuls per group a GPU without grouped_mm's one kernel takes, every row as PEFT's."""
    calls = []
    monkeypatch.setattr(adapters, "has_grouped_mm", lambda inputs: False)
    monkeypatch.setattr(adapters, "mm_by_group", lambda *args: calls.append(1) or MM_BY_GROUP(*args))
    served = Harness(tiny_backbone, tmp_path / "store", max_batch_size=12)
    for name in ("lora-a", "lora-a2", "lora-a3"):  # the same weights as three tasks: PEFT's answers are lora-a's
        served.store.register_dir(name, module_adapters["lora-a"])
    rows = [("lora-a", TEXTS[i % len(TEXTS)]) for i in range(10)] + [("lora-a2", TEXTS[0]), ("lora-a3", TEXTS[3])]
    for (_, text), completion in zip(rows, served.run(*(served.request(t, task) for task, t in rows)), strict=True):
        check(completion, references[("lora-a", text)])
    assert calls, "no step took the grouped path"


MM_BY_GROUP = adapters.mm_by_group


def test_a_torch_without_grouped_mm_multiplies_group_by_group(monkeypatch: pytest.MonkeyPatch) -> None:
    """pyproject allows torch from 2.5; grouped_mm came in 2.9."""
    assert adapters.has_grouped_mm(torch.zeros(2, 4))  # on the CPU, where this torch has it
    monkeypatch.delattr(F, "grouped_mm")
    assert not adapters.has_grouped_mm(torch.zeros(2, 4))
