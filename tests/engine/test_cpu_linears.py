"""The shared pass's linear layers through oneDNN on the CPU (server/engine/cpu_linears.py): a large call takes
oneDNN's product and equals torch's within float32 rounding, a small one is torch's own, `auto` packs only where the
timed product is faster, and the engine with every linear layer through oneDNN still equals PEFT's uncached forward
for every kind of task mixed in one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional

from server.engine import cpu_linears
from server.engine.cpu_linears import Packed
from tests.engine.harness import Harness
from tests.engine.test_lora import check
from tests.fixtures import EOS_ID, TinyBackbone
from tests.lora_fixtures import write_module_adapter
from tests.reference import greedy_with_logprobs, peft_model

CPU = torch.device("cpu")


def linear(in_features: int, out_features: int, seed: int = 0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features).eval().requires_grad_(False)


def is_packed(module: torch.nn.Module) -> bool:
    return "forward" in module.__dict__  # an instance attribute: the class's forward is replaced for this module


def test_a_large_call_takes_onednn_and_equals_torch_within_rounding() -> None:
    module = linear(512, 1376)
    expected = functional.linear(x := torch.randn(32, 512), module.weight, module.bias)
    assert cpu_linears.install([module], CPU, "onednn") == 1
    packed: Packed = module.forward.args[0]  # type: ignore[attr-defined]
    assert packed.takes(x) and not packed.takes(x[:2]) and not packed.takes(x.flatten())
    served = module(x)
    assert served.layout == torch.strided and served.shape == (32, 1376)
    torch.testing.assert_close(served, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module(x.view(4, 8, 512)), expected.view(4, 8, 1376), rtol=1e-5, atol=1e-5)
    assert torch.equal(module(x[:2]), functional.linear(x[:2], module.weight, module.bias))  # torch's own product


def test_hooks_see_the_packed_output() -> None:
    """A LoRA forward hook on the module still runs and changes what the caller gets."""
    module = linear(512, 1376)
    cpu_linears.install([module], CPU, "onednn")
    module.register_forward_hook(lambda _module, _args, output: output + 1)
    x = torch.randn(32, 512)
    torch.testing.assert_close(module(x), functional.linear(x, module.weight, module.bias) + 1, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("speedup", "packed"), [(1.0, False), (cpu_linears.MIN_SPEEDUP, True), (2.0, True)])
def test_auto_packs_only_where_the_timed_product_is_faster(speedup: float, packed: bool) -> None:
    modules = [linear(512, 1376), linear(1376, 512, seed=1)]
    timed: list[torch.nn.Linear] = []

    def speedup_of(module: torch.nn.Linear) -> float:
        timed.append(module)
        return speedup

    assert cpu_linears.install(modules, CPU, "auto", speedup_of, available=1 << 40) == (2 if packed else 0)
    assert timed == [modules[0]] and [is_packed(m) for m in modules] == [packed, packed]


def test_auto_leaves_the_layers_where_their_copy_would_take_over_half_the_memory_left() -> None:
    modules = [linear(512, 1376)]  # 2.7 MiB of weights
    copied = 512 * 1376 * 4
    assert cpu_linears.install(modules, CPU, "auto", lambda _: 2.0, available=2 * copied - 1) == 0
    assert not is_packed(modules[0])
    assert cpu_linears.install(modules, CPU, "onednn", available=0) == 1  # asked for: made anyway
    assert cpu_linears.install([linear(512, 1376)], CPU, "auto", lambda _: 2.0, available=2 * copied) == 1


def test_auto_leaves_a_model_too_small_to_gain_without_timing_it() -> None:
    def speedup_of(module: torch.nn.Linear) -> float:
        raise AssertionError("a model whose calls never reach MIN_MACS is not timed")

    modules = [linear(48, 128)]
    assert cpu_linears.install(modules, CPU, "auto", speedup_of) == 0 and not is_packed(modules[0])


def test_torch_and_other_devices_leave_the_layers() -> None:
    module = linear(512, 1376)
    assert cpu_linears.install([module], CPU, "torch") == 0
    assert cpu_linears.install([module], torch.device("cuda"), "onednn") == 0
    assert not is_packed(module)


def test_only_plain_float32_linear_layers_are_taken() -> None:
    class Quantized(torch.nn.Linear):
        pass

    modules: dict[str, torch.nn.Module] = {
        "plain": linear(8, 8), "half": linear(8, 8).to(torch.bfloat16), "subclass": Quantized(8, 8),
        "norm": torch.nn.LayerNorm(8),
    }  # fmt: skip
    assert cpu_linears.shared_linears(modules, list(modules)) == [modules["plain"]]


def test_the_engine_through_onednn_equals_peft_for_every_kind_mixed(tiny_llama: TinyBackbone, tmp_path: Path) -> None:
    """Every shared-pass linear layer of the tiny Llama through oneDNN (every call, however small): bare, prompt,
    P-tuning, prefix and LoRA rows in one batch, each equal to PEFT's uncached forward with torch's own kernels."""
    harness = Harness(tiny_llama, tmp_path / "store", max_batch_tokens=7, kv_block_size=4)
    lora = write_module_adapter(tiny_llama.path, "lora", tmp_path / "lora", seed=3,
                                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], r=4)  # fmt: skip
    harness.store.register_dir("lora", lora)
    backbone = harness.backbone
    assert harness.through_onednn() >= 7 * backbone.model.config.num_hidden_layers
    assert not is_packed(backbone.model.get_output_embeddings())  # the output layer runs apart, as it was

    tasks: list[str | None] = [None, "prompt_tuning", "p_tuning_mlp", "prefix_projection", "lora"]
    texts = ["hello world", "the quick brown fox", "xyz", "adapters in one batch", "onednn"]
    completions = harness.run(
        *[harness.request(t, task, max_new_tokens=6) for t, task in zip(texts, tasks, strict=True)]
    )
    tokenizer = Harness.tokenizer_of(tiny_llama)
    for task, text, completion in zip(tasks, texts, completions, strict=True):
        if task == "lora":
            from peft import PeftModel

            model = PeftModel.from_pretrained(peft_model(tiny_llama, None), lora).eval()
        else:
            model = peft_model(tiny_llama, task)
        check(completion, greedy_with_logprobs(model, tokenizer(text)["input_ids"], 6, {EOS_ID}))
