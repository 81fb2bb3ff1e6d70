"""`promptserve train` end to end on the tiny fixtures: it learns, it is repeatable, it refuses before training
what would fail later, Ctrl-C writes nothing, and --register serves the task through a real port."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from pydantic import SecretStr
from transformers import AutoModelForCausalLM, AutoTokenizer, T5Config, T5ForConditionalGeneration

from prompt_store.adapter import StoreLimits, parse_adapter
from promptserve_client import Client, ConflictError
from server.api.settings import Settings
from server.cli import main as promptserve
from server.engine.backbone import fingerprint_of
from server.train import cli as train_cli
from tests.fixtures import TinyBackbone
from tests.live_server import free_port, live_server
from tests.nlu_fixtures import write_nlu_backbone
from tests.reference import peft_greedy
from tests.seq2seq_fixtures import write_seq2seq_backbone

TOKEN = "train-test-token"


def train(backbone: TinyBackbone, data: Path, output: Path, *extra: str) -> int:
    argv = ["train", "--model", str(backbone.path), "--data", str(data), "--output", str(output), "--quiet"]
    return promptserve([*argv, "--steps", "100", "--batch-size", "8", "--warmup", "5", *extra])


def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> list[float]:
        raise AssertionError("training started")

    monkeypatch.setattr(train_cli, "train_loop", fail)


@pytest.mark.parametrize("method", ["prompt", "p-tuning", "prefix"])
def test_a_short_run_learns_and_writes_what_the_store_takes(
    tiny_llama: TinyBackbone, data: Path, tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "task"
    assert train(tiny_llama, data, output, "--method", method, "--num-virtual-tokens", "4", "--steps", "150") == 0
    metrics = json.loads((output / "metrics.json").read_text())
    assert len(metrics["loss_curve"]) == metrics["steps"] == 150
    assert metrics["loss_last"] < metrics["loss_first"] / 2, metrics["loss_curve"]
    assert metrics["num_train"] + metrics["num_eval"] == 48 and metrics["num_eval"] == 5
    assert 0 <= metrics["base_exact_match"] <= metrics["exact_match"] <= 1
    assert (output / "loss.png").read_bytes().startswith(b"\x89PNG")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama.path)
    config = parse_adapter(
        (output / "adapter_config.json").read_bytes(),
        (output / "adapter_model.safetensors").read_bytes(),
        fingerprint_of(model),
        StoreLimits(),
    ).config
    assert config["num_virtual_tokens"] == 4 and config["base_model_name_or_path"] == str(tiny_llama.path)
    out = capsys.readouterr().out
    assert f"trained {method} (4 virtual tokens" in out and "exact match on 5 held-out pairs" in out


def test_the_same_seed_gives_the_same_adapter(tiny_llama: TinyBackbone, data: Path, tmp_path: Path) -> None:
    weights = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        assert train(tiny_llama, data, tmp_path / name, "--method", "p-tuning", "--steps", "5", "--seed", seed) == 0
        weights.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert weights[0] == weights[1] != weights[2]


def test_an_eval_file_replaces_the_split(tiny_llama: TinyBackbone, data: Path, tmp_path: Path) -> None:
    held_out = tmp_path / "eval.jsonl"
    held_out.write_text('{"input": "cat", "output": "<s>ok"}\n{"input": "sun", "output": "<s>ok"}\n')
    assert train(tiny_llama, data, tmp_path / "task", "--method", "prompt", "--eval", str(held_out)) == 0
    metrics = json.loads((tmp_path / "task" / "metrics.json").read_text())
    assert (metrics["num_train"], metrics["num_eval"]) == (48, 2)


def test_ctrl_c_writes_nothing_and_keeps_a_previous_output(
    tiny_llama: TinyBackbone,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "task"
    assert train(tiny_llama, data, output, "--method", "prompt", "--steps", "2") == 0
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    for where in ("train_loop", "plot_losses"):  # while training, and half-way through writing the output
        monkeypatch.setattr(train_cli, where, interrupted)
        assert train(tiny_llama, data, output, "--method", "prompt") == 130
        assert "interrupted" in capsys.readouterr().err
        assert {path.name: path.read_bytes() for path in output.iterdir()} == before
        assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []
        monkeypatch.undo()
    monkeypatch.setattr(train_cli, "train_loop", interrupted)
    assert train(tiny_llama, data, tmp_path / "new", "--method", "prompt") == 130
    assert not (tmp_path / "new").exists()


def write_t5(root: Path) -> Path:
    config = T5Config(vocab_size=300, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2)
    T5ForConditionalGeneration(config).save_pretrained(root / "t5")
    return root / "t5"


def refusal(capsys: pytest.CaptureFixture[str], tiny: TinyBackbone, data: Path, output: Path, *extra: str) -> str:
    assert train(tiny, data, output, "--method", "prompt", *extra) == 2
    return capsys.readouterr().err


def test_refusals_come_before_training(
    tiny_llama: TinyBackbone,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    no_training(monkeypatch)
    out = tmp_path / "task"
    (tmp_path / "empty.jsonl").write_text("")
    assert "found none" in refusal(capsys, tiny_llama, tmp_path / "empty.jsonl", out)
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "output": "b"}\n{"input": "a", "output": 1}\n')
    assert "bad.jsonl line 2: expected a string field 'output'; found int" in refusal(
        capsys, tiny_llama, tmp_path / "bad.jsonl", out
    )
    (tmp_path / "bad.jsonl").write_text('{"input": "a", "output": "b</s>c"}\n')
    assert "bad.jsonl line 1: expected an output without the end-of-sequence token" in refusal(
        capsys, tiny_llama, tmp_path / "bad.jsonl", out
    )
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    (mine / "adapter_config.json").write_text("{}")  # an adapter beside a user's own files is not ours to replace
    assert f"found {mine} holding notes.txt" in refusal(capsys, tiny_llama, data, mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    assert "found a file" in refusal(capsys, tiny_llama, data, data)
    assert "expected to write a directory beside" in refusal(capsys, tiny_llama, data, data / "sub")
    t5 = TinyBackbone("t5", write_t5(tmp_path))
    assert "expected a causal LM" in refusal(capsys, t5, data, out)
    assert "num_virtual_tokens must be at most 256; found 300" in refusal(
        capsys, tiny_llama, data, out, "--num-virtual-tokens", "300"
    )
    long = tmp_path / "long.jsonl"
    long.write_text("".join(json.dumps({"input": "x" * n, "output": "y"}) + "\n" for n in (3, 4, 490)))
    expected = f"{long} line 3: expected a pair that fits the backbone's 512 positions beside 20 virtual tokens"
    assert expected in refusal(capsys, tiny_llama, long, out, "--eval", str(data))
    assert expected in refusal(capsys, tiny_llama, data, out, "--eval", str(long))  # scored pairs too
    if not torch.cuda.is_available():
        assert "expected a device this machine has" in refusal(capsys, tiny_llama, data, out, "--device", "cuda")
    assert "expected a device this machine has" in refusal(capsys, tiny_llama, data, out, "--device", "gpu")
    assert not out.exists()
    monkeypatch.chdir(tmp_path)
    assert "found the working directory" in refusal(capsys, tiny_llama, data, Path("."))


@pytest.mark.parametrize(
    ("arch", "found"),
    [("t5", "a t5 encoder-decoder"), ("bert", "a bert encoder"), ("roberta", "a roberta encoder")],
)
def test_a_backbone_served_with_other_task_types_is_refused_in_one_line(
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    arch: str,
    found: str,
) -> None:
    """AutoModelForCausalLM lists every class it knows for a T5 and loads BERT or RoBERTa as a decoder; either way
    the task could never be served by their servers (SEQ_2_SEQ_LM, SEQ_CLS and TOKEN_CLS tasks only)."""
    no_training(monkeypatch)
    write = write_seq2seq_backbone if arch == "t5" else write_nlu_backbone
    path = write(arch, tmp_path / arch)
    err = refusal(capsys, TinyBackbone(arch, path), data, tmp_path / "task")
    message = err.splitlines()[-1]  # the fixture's progress bars come first
    assert message.startswith(f"promptserve train: expected a causal LM at {path}") and f"found {found}" in message
    assert not (tmp_path / "task").exists()


def served(tiny: TinyBackbone, tmp_path: Path, **overrides: Any) -> Any:
    settings = Settings(
        model=str(tiny.path),
        store_dir=str(tmp_path / f"store-{free_port()}"),
        demo_tasks=False,
        poll_interval_s=0,
        log_level="critical",
        admin_token=SecretStr(TOKEN),
        **overrides,
    )
    return live_server(settings)


def test_register_serves_the_task_when_the_command_returns(
    tiny_llama: TinyBackbone, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "ok-task"
    with served(tiny_llama, tmp_path) as url:
        assert train(tiny_llama, data, output, "--method", "prefix", "--register", url, "--token", TOKEN) == 0
        out = capsys.readouterr().out
        record = json.loads(out[out.index("\n{") :])
        assert record["task_id"] == "ok-task" and record["version"] == 1 and record["method"] == "prefix_tuning"
        with Client(url) as client:
            answer = client.generate("cat dog", task_id="ok-task", max_new_tokens=6, details=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama.path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama.path), output).eval()
    expected = peft_greedy(model, tokenizer("cat dog")["input_ids"], 6)
    assert answer.details is not None and [token.id for token in answer.details.tokens or []] == expected


def test_register_refusals_come_before_training(
    tiny_llama: TinyBackbone, tiny_gpt2: TinyBackbone, data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    no_training(monkeypatch)
    out = tmp_path / "task"
    unreachable = f"http://127.0.0.1:{free_port()}"
    assert f"expected a promptserve server at {unreachable}" in refusal(
        capsys, tiny_llama, data, out, "--register", unreachable
    )
    bad_url = "http://[::1"
    assert f"expected a promptserve server at {bad_url}" in refusal(
        capsys, tiny_llama, data, out, "--register", bad_url
    )
    with served(tiny_gpt2, tmp_path) as url:
        assert f"expected the server at {url} to serve this backbone" in refusal(
            capsys, tiny_llama, data, out, "--register", url, "--token", TOKEN
        )
    with served(tiny_llama, tmp_path, max_virtual_tokens=8) as url:
        assert "expected an admin token the server" in refusal(capsys, tiny_llama, data, out, "--register", url)
        register = ["--register", url, "--token", TOKEN]
        assert "num_virtual_tokens must be at most 8; found 20" in refusal(capsys, tiny_llama, data, out, *register)
        assert "task_id must match" in refusal(capsys, tiny_llama, data, out, *register, "--task-id=-x")
        assert "give --task-id" in refusal(capsys, tiny_llama, data, tmp_path / ".hidden", *register)
    assert not out.exists()


def test_a_refused_registration_keeps_the_adapter_and_says_how_to_register_it(
    tiny_llama: TinyBackbone,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def refused(self: Client, task_id: str, adapter_dir: Path) -> None:
        raise ConflictError("the store is being replaced", 409)  # what checks before training cannot foresee

    monkeypatch.setattr(Client, "register_task", refused)
    output = tmp_path / "task"
    with served(tiny_llama, tmp_path) as url:
        assert train(tiny_llama, data, output, "--method", "prompt", "--register", url, "--token", TOKEN) == 1
    error = capsys.readouterr().err
    assert "did not register the task: the store is being replaced" in error
    assert f"promptserve tasks add task {output} --url {url}" in error
    assert (output / "adapter_model.safetensors").exists()


def test_a_diverged_run_writes_nothing(
    tiny_llama: TinyBackbone,
    data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    output = tmp_path / "task"
    assert train(tiny_llama, data, output, "--method", "prompt", "--steps", "2") == 0
    before = (output / "adapter_model.safetensors").read_bytes()
    real_loss = train_cli.loss_function

    def diverging(model: Any, device: torch.device) -> Any:  # the 7th step's loss is NaN
        loss_of, steps = real_loss(model, device), itertools.count(1)

        def loss(batch: Any) -> torch.Tensor:
            return loss_of(batch) * (float("nan") if next(steps) == 7 else 1.0)

        return loss

    monkeypatch.setattr(train_cli, "loss_function", diverging)
    assert train(tiny_llama, data, output, "--method", "prompt") == 2
    assert "the loss became nan at step 7; try a lower learning rate" in capsys.readouterr().err
    assert (output / "adapter_model.safetensors").read_bytes() == before


@pytest.mark.parametrize("flags", [["--warmup", "-1"], ["--epochs", "1"], ["--eval-fraction", "1"]])
def test_flags_out_of_range_are_usage_errors(
    tiny_llama: TinyBackbone, data: Path, tmp_path: Path, flags: list[str]
) -> None:  # the helper passes --steps: --epochs with it is one too many
    with pytest.raises(SystemExit) as exit_:
        train(tiny_llama, data, tmp_path / "task", "--method", "prompt", *flags)
    assert exit_.value.code == 2


@pytest.mark.slow
def test_sigint_in_a_real_process_stops_with_nothing_written(
    tiny_llama: TinyBackbone, data: Path, tmp_path: Path
) -> None:
    output = tmp_path / "task"
    command = [sys.executable, "-m", "server.cli", "train", "--model", str(tiny_llama.path), "--data", str(data),
               "--output", str(output), "--method", "prefix", "--steps", "1000000"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().startswith("training prefix on 43 pairs for 1000000 steps")
    time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == [data]
