"""The hooks' grouped deltas (one sort per pass, batched or grouped matmuls over stacked weights, IA3 by table) equal
each task's delta computed alone on its own tokens, PEFT's arithmetic, over every layout a pass can have: ranks mixed,
tasks on several rows, rows with no task, LoRA beside IA3 on one module, one task on every token, and a bfloat16
model (the delta in float32, rounded once into the output, as PEFT's LoRA and IA3 layers do)."""

from __future__ import annotations

import pytest
import torch

from server.engine.adapters import AdapterHooks, DeviceAdapter, DeviceIA3, DeviceLora, Grouping

IN, OUT = 24, 20
MODULES = ("proj", "feedforward")


def lora(rank: int, generator: torch.Generator, scaling: float = 1.5) -> DeviceLora:
    return DeviceLora(torch.randn(rank, IN, generator=generator), torch.randn(OUT, rank, generator=generator), scaling)


def ia3(dim: int, is_feedforward: bool, generator: torch.Generator) -> DeviceIA3:
    return DeviceIA3(1 + torch.randn(dim, generator=generator), is_feedforward)


def adapter(name: str, modules: dict[str, DeviceLora | DeviceIA3]) -> DeviceAdapter:
    return DeviceAdapter((name, 1), modules, nbytes=0)


def adapters() -> dict[str, DeviceAdapter]:
    """LoRA of ranks 2, 8 and 5 (one with its own scaling, one on the proj only), and IA3 on the output or input."""
    g = torch.Generator().manual_seed(0)
    return {
        "r2": adapter("r2", {"proj": lora(2, g), "feedforward": lora(2, g)}),
        "r8": adapter("r8", {"proj": lora(8, g, scaling=0.25), "feedforward": lora(8, g)}),
        "r5-proj": adapter("r5-proj", {"proj": lora(5, g)}),
        "ia3": adapter("ia3", {"proj": ia3(OUT, False, g), "feedforward": ia3(IN, True, g)}),
    }


def reference(
    module: str, base: torch.nn.Linear, x: torch.Tensor, rows: list[DeviceAdapter | None], lengths: list[int]
) -> torch.Tensor:
    """Each row on its own, PEFT's forward for its task alone (the delta or the vector in the weights' dtype)."""
    outputs, start = [], 0
    for task, length in zip(rows, lengths, strict=True):
        part = x[start : start + length]
        start += length
        weights = task.modules.get(module) if task is not None else None
        if isinstance(weights, DeviceIA3) and weights.is_feedforward:
            outputs.append(base((part.to(weights.scales.dtype) * weights.scales).to(part.dtype)))
        elif isinstance(weights, DeviceIA3):
            outputs.append((base(part) * weights.scales).to(part.dtype))
        elif isinstance(weights, DeviceLora):
            hidden = part.to(weights.lora_a.dtype) @ weights.lora_a.T
            outputs.append((base(part) + hidden @ weights.lora_b.T * weights.scaling).to(part.dtype))
        else:
            outputs.append(base(part))
    return torch.cat(outputs)


def hooked(dtype: torch.dtype) -> tuple[AdapterHooks, dict[str, torch.nn.Linear]]:
    torch.manual_seed(1)
    bases = {name: torch.nn.Linear(IN, OUT).to(dtype) for name in MODULES}
    hooks = AdapterHooks(dict(bases))
    for task in adapters().values():
        hooks.install(task)
    return hooks, bases


LAYOUTS = {
    # a decode step: one token a row, some tasks on several rows (the padded batched matmul)
    "decode": (["r2", "r8", None, "ia3", "r5-proj", "r8", "r2", None, "r5-proj"], [1] * 9),
    # a prefill: rows of uneven length (the grouped matmul over segments)
    "prefill": (["r8", None, "r2", "ia3", "r5-proj", "r8"], [7, 3, 1, 4, 2, 1]),
    # a long prefill: rows of 8 tokens or more (a matmul pair per run at the task's own rank; r2's two rows one run)
    "long-prefill": (["r8", None, "r2", "r2", "ia3", "r5-proj", "r8"], [12, 3, 9, 8, 4, 10, 8]),
    # tasks with two tokens each except one (padded rows dropped)
    "uneven-decode": (["r2", "r8", "r5-proj", "r2"], [1, 1, 1, 1]),
    "one-task-every-token": (["r8", "r8", "r8"], [3, 1, 2]),
    "one-ia3-task-every-token": (["ia3", "ia3"], [2, 3]),
    "one-task-beside-bare-rows": ([None, "r2", None], [2, 3, 1]),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("module", MODULES)
def test_grouped_deltas_equal_each_task_alone(layout: str, module: str):
    hooks, bases = hooked(torch.float32)
    tasks = adapters()
    names, lengths = LAYOUTS[layout]
    rows = [tasks[name] if name else None for name in names]
    x = torch.randn(sum(lengths), IN, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad(), hooks.tokens(rows, lengths, torch.device("cpu")):
        grouped = bases[module](x)
    expected = reference(module, bases[module], x, rows, lengths)
    torch.testing.assert_close(grouped, expected, rtol=1e-5, atol=1e-5)
    assert (grouped - bases[module](x)).abs().max() > 1, "the deltas are large enough to matter"


def test_a_task_keeps_its_stack_place_while_held_and_a_newcomer_takes_a_free_one():
    """A pass repeating its tasks copies nothing; a new task is copied into a place of its own (the stack grows when
    full), a task of the same key with other weights (reloaded, or the self-check's task rebuilt) too; a task no
    row holds frees its place (the last task moves into it) for the next newcomer, and a stack with no task held
    goes."""
    hooks, bases = hooked(torch.float32)
    tasks = adapters()
    other_r2 = adapter("r2", {"proj": lora(2, torch.Generator().manual_seed(9))})
    newcomer = adapter("r3", {"proj": lora(3, torch.Generator().manual_seed(10))})
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(3))
    named = {**tasks, "other-r2": other_r2, "r3": newcomer}

    def run(names: list[str | None]) -> None:
        rows = [named[name] if name else None for name in names]
        with torch.inference_mode(), hooks.tokens(rows, [1] * 4, torch.device("cpu")):  # as the engine's passes
            grouped = bases["proj"](x)
        torch.testing.assert_close(grouped, reference("proj", bases["proj"], x, rows, [1] * 4), rtol=1e-5, atol=1e-5)

    run(["r2", "r8", None, "r2"])
    stack = hooks.stacks["proj"]
    weights = stack.lora_a.data_ptr()
    run(["r8", "r2", None, "r2"])
    assert stack.lora_a.data_ptr() == weights, "the same tasks in another order: nothing copied"
    run(["r8", "r5-proj", "r2", None])
    run(["r8", "r5-proj", "other-r2", None])
    assert [task and task.key[0] for task in stack.tasks] == ["r2", "r8", "r5-proj", "r2"]
    assert stack.tasks[3] is other_r2
    hooks.drop_stacks(lambda key: key != ("r5-proj", 1))
    assert stack.tasks == [tasks["r2"], tasks["r8"], other_r2, None], "the last task moved into the freed place"
    assert hooks.stacked_bytes == stack.nbytes > 0
    weights = stack.lora_a.data_ptr()
    run(["other-r2", "r8", None, "r3"])
    assert stack.tasks[3] is newcomer and stack.lora_a.data_ptr() == weights, "the free place, no growth"
    hooks.drop_stacks(lambda key: False)
    assert hooks.stacks == {} and hooks.stacked_bytes == 0


def test_a_stack_of_few_tasks_left_shrinks_and_keeps_their_weights():
    hooks, bases = hooked(torch.float32)
    g = torch.Generator().manual_seed(11)
    many = [adapter(f"t{i}", {"proj": lora(4, g)}) for i in range(8)]
    x = torch.randn(8, IN, generator=torch.Generator().manual_seed(12))
    with torch.no_grad(), hooks.tokens(list(many), [1] * 8, torch.device("cpu")):
        bases["proj"](x)
    stack = hooks.stacks["proj"]
    hooks.drop_stacks(lambda key: key in {("t5", 1), ("t6", 1)})
    assert len(stack.tasks) == 4 and stack.tasks[:2] == [many[5], many[6]]
    rows = [many[6], None, many[5], many[6]]
    with torch.no_grad(), hooks.tokens(rows, [2, 1, 3, 2], torch.device("cpu")):
        grouped = bases["proj"](x)
    torch.testing.assert_close(grouped, reference("proj", bases["proj"], x, rows, [2, 1, 3, 2]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "layout", ["decode", "prefill", "long-prefill", "one-task-every-token", "one-ia3-task-every-token"]
)
@pytest.mark.parametrize("module", MODULES)
def test_a_bfloat16_output_gets_the_float32_delta_rounded_once(layout: str, module: str):
    """As PEFT in a bfloat16 model (adapter weights kept in float32): the output is rounded once, after the delta
    is added in float32, not the delta first and then the sum."""
    hooks, bases = hooked(torch.bfloat16)
    tasks = adapters()
    names, lengths = LAYOUTS[layout]
    rows = [tasks[name] if name else None for name in names]
    x = (torch.randn(sum(lengths), IN, generator=torch.Generator().manual_seed(4)) * 3).to(torch.bfloat16)
    with torch.no_grad(), hooks.tokens(rows, lengths, torch.device("cpu")):
        grouped = bases[module](x)
    expected = reference(module, bases[module], x, rows, lengths)
    assert grouped.dtype == torch.bfloat16
    torch.testing.assert_close(grouped, expected, rtol=0, atol=0.07)  # the float32 sums' order: at most an ulp


def test_the_pass_is_sorted_once_per_set_of_tasks():
    """Modules that the same tasks target share one sort; the padded layout drops the padding rows."""
    tasks = adapters()
    rows = [tasks["r2"], None, tasks["r8"], tasks["r2"], tasks["r5-proj"]]
    grouping = Grouping.of(rows, [1, 1, 1, 1, 1], torch.device("cpu"))
    assert grouping is not None and not grouping.is_whole
    segments = grouping.segments_of((0, 1, -1))  # r2 (rows 0 and 3) in group 0, r8 (row 2) in 1, r5-proj in none
    assert grouping.segments_of((0, 1, -1)) is segments
    assert segments.index.tolist() == [0, 3, 2] and segments.offsets.tolist() == [2, 3]
    assert segments.padded is not None and segments.kept is not None
    assert segments.padded[segments.kept].tolist() == [0, 3, 2]
    assert Grouping.of([None, None], [2, 1], torch.device("cpu")) is None
