"""The loop's pieces: padding and the loss span, the schedule, and an output directory that is never half-written."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from server.train.loop import IGNORE_INDEX, Batch, collate, epoch_batches, lr_at, replace_dir, train_loop


def test_collate_right_pads_and_masks_the_loss() -> None:
    batch = collate([([1, 2, 3], 1), ([4, 5], 2)], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]]


def test_epoch_batches_cover_every_example_once_an_epoch() -> None:
    examples = [([i] * (1 + i % 5), 0) for i in range(37)]
    batches = epoch_batches(examples, random.Random(0), batch_size=4, pad_id=0)
    seen = [row[0] for batch in (next(batches) for _ in range(10)) for row in batch.input_ids.tolist()]
    assert sorted(seen) == list(range(37))  # 10 batches: 9 of 4 and the epoch's last of 1


def test_schedule_warms_up_then_decays_to_a_tenth() -> None:
    rates = [lr_at(step, 100, 1.0, warmup=10) for step in range(100)]
    assert rates[0] == pytest.approx(0.1) and rates[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(rates[9:]))
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def write_files(names: list[str]):  # type: ignore[no-untyped-def]
    def build(directory: Path) -> None:
        for name in names:
            (directory / name).write_text(name)

    return build


def test_replace_dir_swaps_in_a_finished_directory(tmp_path: Path) -> None:
    target = tmp_path / "out"
    replace_dir(write_files(["a"]), target)
    replace_dir(write_files(["b"]), target)
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left behind
    assert oct(target.stat().st_mode & 0o777) == "0o755" and oct((target / "b").stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_build_leaves_the_previous_directory(tmp_path: Path, error: type[BaseException]) -> None:
    target = tmp_path / "out"
    replace_dir(write_files(["old"]), target)

    def interrupted(directory: Path) -> None:
        (directory / "half").write_text("written")
        raise error

    with pytest.raises(error):
        replace_dir(interrupted, target)
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_interrupt_between_the_renames_restores_the_previous_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "out"
    replace_dir(write_files(["old"]), target)
    renames: list[Path] = []
    real_rename = Path.rename

    def rename(self: Path, to: Path) -> Path:  # the second rename (staging -> target) is interrupted
        renames.append(self)
        if len(renames) == 2:
            raise KeyboardInterrupt
        return real_rename(self, to)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        replace_dir(write_files(["new"]), target)
    monkeypatch.undo()
    assert [p.name for p in target.iterdir()] == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_loop_returns_every_loss_and_lowers_it() -> None:
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(3))
    batch = Batch(torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1))

    def loss_of(_: Batch) -> torch.Tensor:
        return ((weight - torch.tensor([1.0, -2.0, 3.0])) ** 2).sum()

    losses = train_loop([weight], loss_of, iter(lambda: batch, None), 50, 0.1, warmup=5, progress=False)
    assert len(losses) == 50 and losses[-1] < losses[0] / 10
