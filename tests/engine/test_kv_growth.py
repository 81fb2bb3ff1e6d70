"""GrowingLayer: appends into spare capacity and always holds exactly what concatenation would."""

from __future__ import annotations

import torch

from server.engine.batch import GrowingCache, GrowingLayer


def kv(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn((batch, 2, length, 4), generator=torch.Generator().manual_seed(seed))


def test_updates_equal_concatenation_and_reuse_the_buffer_until_full():
    layer = GrowingLayer()
    expected = kv(3, 10, 0)
    layer.update(expected, expected * 2)
    buffer, capacity = layer.key_buffer, layer.key_buffer.shape[2]
    assert capacity == 10 + GrowingLayer.MIN_SPARE
    for step in range(1, capacity - 10 + 1):
        new = kv(3, 1, step)
        keys, values = layer.update(new, new * 2)
        expected = torch.cat([expected, new], dim=2)
        assert torch.equal(keys, expected) and torch.equal(values, expected * 2)
    assert layer.key_buffer is buffer  # filled to capacity without a copy
    keys, _ = layer.update(kv(3, 1, 99), kv(3, 1, 99))
    assert layer.key_buffer is not buffer and torch.equal(keys[:, :, :capacity], expected)
    assert layer.get_seq_length() == capacity + 1


def test_a_layer_built_from_tensors_keeps_them_and_grows_on_the_first_update():
    prefix = kv(2, 5, 1)
    cache = GrowingCache([prefix], [prefix + 1])
    new = kv(2, 3, 2)
    keys, values = cache.layers[0].update(new, new)
    assert torch.equal(keys, torch.cat([prefix, new], dim=2))
    assert torch.equal(values, torch.cat([prefix + 1, new], dim=2))
    assert cache.get_seq_length() == 8


def test_replaced_keys_are_not_overwritten_by_a_stale_buffer():
    layer = GrowingLayer()
    start = kv(1, 6, 3)
    layer.update(start, start)
    layer.keys, layer.values = layer.keys[:, :, :4].clone(), layer.values[:, :, :4].clone()  # as crop would
    new = kv(1, 1, 4)
    keys, _ = layer.update(new, new)
    assert torch.equal(keys, torch.cat([start[:, :, :4], new], dim=2))
