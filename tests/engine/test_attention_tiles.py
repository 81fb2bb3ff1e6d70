"""A step's attention in batches within TileLimits: every query answered once, each batch within the limits, the
served tokens and log-probabilities those of one batch, and the largest attention temporary bounded by the limits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from server.engine import attention
from server.engine.attention import UNBOUNDED, RowBatch, TileLimits
from server.engine.types import Completion
from tests.engine.harness import Harness, token_ids
from tests.fixtures import ADAPTER_KINDS, TinyBackbone
from tests.seq2seq_fixtures import SEQ2SEQ_ADAPTER_KINDS, build_tiny_seq2seq_backbone

TEXTS = ("hello world", "a", "zz top, twice, and a much longer input than the others", "the quick brown fox", "xy")
SMALL = TileLimits(pairs=96, keys=48)


class Created(TorchDispatchMode):
    """Each tensor an operation returns while the mode is on: its elements and its storage."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[tuple[int, int]] = []  # (numel, storage data_ptr)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else (out,):
            if isinstance(tensor, torch.Tensor):
                self.tensors.append((tensor.numel(), tensor.untyped_storage().data_ptr()))
        return out


def rows(num_new: list[int], key_lengths: list[int]) -> tuple[torch.Tensor, ...]:
    new, lengths = torch.tensor(num_new), torch.tensor(key_lengths)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), new.cumsum(0)[:-1]])
    key_slots = torch.arange(len(new) * 100).view(len(new), 100)
    return key_slots, lengths, offsets, new, lengths - new


@pytest.mark.parametrize("causal", [True, False])
def test_tiles_answer_every_query_once_within_the_limits(causal: bool):
    key_slots, lengths, offsets, new, first = rows([1, 1, 40, 7, 1, 23], [5, 60, 70, 9, 33, 23])
    tiles = RowBatch.tiles(key_slots, lengths, offsets, new, first, SMALL, causal)
    assert len(tiles) > 2
    streamed = torch.cat([tile.stream_index for tile in tiles])
    assert sorted(streamed.tolist()) == list(range(int(new.sum())))
    for tile in tiles:
        num_rows, width = tile.query_index.shape
        assert num_rows == 1 or SMALL.fits(num_rows, width, tile.gather_slots.shape[1])


def test_a_causal_piece_reads_the_keys_up_to_its_last_query():
    key_slots, lengths, offsets, new, first = rows([40], [70])
    tiles = RowBatch.tiles(key_slots, lengths, offsets, new, first, TileLimits(pairs=700, keys=700), causal=True)
    ends = sorted((int(t.query_positions.max()) + 1, int(t.key_lengths.max())) for t in tiles)
    assert len(tiles) > 1 and all(end == length for end, length in ends)
    assert ends[-1][1] == 70


@pytest.mark.parametrize(("causal", "window"), [(True, None), (True, 3), (False, None), (False, 2)])
def test_masks_say_which_keys_each_query_sees(causal: bool, window: int | None):
    key_slots, lengths, offsets, new, first = rows([1, 4, 2], [5, 6, 3])
    batch = RowBatch.of(key_slots, lengths, offsets, new, first, causal)
    mask = batch.build_mask(window)
    for r in range(3):
        for t in range(int(new[r])):
            position = int(first[r]) + t
            for column in range(mask.shape[-1]):
                seen = column < lengths[r] and (not causal or column <= position)
                seen = seen and (window is None or position - column < window)
                assert bool(mask[r, 0, t if mask.shape[2] > 1 else 0, column]) == seen, (r, t, column)


def test_rows_that_fit_make_one_batch():
    key_slots, lengths, offsets, new, first = rows([1, 1, 3], [5, 6, 7])
    assert len(RowBatch.tiles(key_slots, lengths, offsets, new, first, SMALL)) == 1


def mixed(harness: Harness, tasks: tuple[str | None, ...], limits: TileLimits) -> list[Completion]:
    harness.engine.runner.limits = limits
    requests = [harness.request(text, task, max_new_tokens=6) for text, task in zip(TEXTS, tasks, strict=False)]
    return harness.run(*requests, harness.request(TEXTS[2] * 3, None, max_new_tokens=4))


def assert_same(tiled: list[Completion], whole: list[Completion]) -> None:
    """The same tokens; log-probabilities within float32 rounding of a different batch shape (as alone and mixed)."""
    assert [token_ids(c) for c in tiled] == [token_ids(c) for c in whole]
    for a, b in zip(tiled, whole, strict=True):
        served, expected = (torch.tensor([token.logprob for token in c.tokens]) for c in (a, b))
        torch.testing.assert_close(served, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunked", [False, True])
def test_tiled_attention_serves_what_one_batch_serves(tiny_backbone: TinyBackbone, tmp_path: Path, chunked: bool):
    config = {"max_batch_tokens": 13, "kv_block_size": 4} if chunked else {}
    harness = Harness(tiny_backbone, tmp_path / "store", **config)  # type: ignore[arg-type]
    tasks = (*ADAPTER_KINDS, None)
    assert_same(mixed(harness, tasks, SMALL), mixed(harness, tasks, UNBOUNDED))


def test_tiled_cross_attention_serves_what_one_batch_serves(tmp_path: Path):
    seq2seq = build_tiny_seq2seq_backbone("t5", tmp_path / "t5")
    harness = Harness(seq2seq, tmp_path / "store", max_batch_tokens=9, kv_block_size=4)
    tasks = (*SEQ2SEQ_ADAPTER_KINDS, None)
    assert_same(mixed(harness, tasks, TileLimits(pairs=40, keys=30)), mixed(harness, tasks, UNBOUNDED))


def largest_attention_tensor(harness: Harness, limits: TileLimits, monkeypatch: pytest.MonkeyPatch) -> int:
    """The most elements of a tensor made inside the engine's attention, but its output and views of its inputs
    (the stream's queries, the pool), over one step that prefills a long row beside short ones."""
    largest = 0
    attend_batches = attention.attend_batches

    def watched(*args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal largest
        with Created() as created:
            output, _ = attend_batches(*args, **kwargs)
        given = {t.untyped_storage().data_ptr() for t in (output, *args) if isinstance(t, torch.Tensor)}
        largest = max([largest, *(numel for numel, storage in created.tensors if storage not in given)])
        return output, None

    monkeypatch.setattr(attention, "attend_batches", watched)
    harness.engine.runner.limits = limits
    for text in (TEXTS[0], TEXTS[2] * 4, TEXTS[1]):
        harness.engine.add(harness.request(text, None, max_new_tokens=1))
    harness.step()
    monkeypatch.undo()
    return largest


def test_tile_limits_bound_the_largest_attention_temporary(tiny_llama: TinyBackbone, tmp_path: Path, monkeypatch):
    """Masks, scores and gathered keys grow with the padded rows x queries x keys of a batch; within limits they
    stay under heads x pairs (and kv_heads x head_dim x keys), whatever the step's rows."""
    harness = Harness(tiny_llama, tmp_path / "store")
    fp = harness.backbone.fingerprint
    limits = TileLimits(pairs=512, keys=256)
    heads = fp.num_attention_heads
    bound = max(heads * limits.pairs, fp.num_key_value_heads * fp.head_dim * limits.keys)
    assert largest_attention_tensor(harness, UNBOUNDED, monkeypatch) > bound  # the step would pass it in one batch
    assert largest_attention_tensor(harness, limits, monkeypatch) <= bound
