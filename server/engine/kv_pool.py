"""The KV pool: every layer's keys and values for a fixed number of blocks, allocated once when the engine starts.

Slot `block * block_size + offset` holds one token's keys and values in every layer; `KVMemory` says which
blocks hold what. Sized from a byte budget: configured, or on a GPU a fraction of the memory the model and the
profiled worst step leave (memory_profile.py).
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain

import torch

from prompt_store.types import BackboneFingerprint

CPU_DEFAULT_BYTES = 1 << 30
HOST = torch.device("cpu")  # where a step's index tensors are built, to be copied to the engine's device


@dataclass(frozen=True, slots=True)
class KVPool:
    keys: list[torch.Tensor]  # per layer [num_blocks * block_size, kv_heads, head_dim]
    values: list[torch.Tensor]
    block_size: int

    @classmethod
    def allocate(
        cls,
        fp: BackboneFingerprint,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> KVPool:
        """`num_layers`: layers of keys and values, as the backbone's kind needs them."""
        shape = (num_blocks * block_size, fp.num_key_value_heads, fp.head_dim)
        keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        return cls(keys, values, block_size)

    @property
    def block_bytes(self) -> int:
        return block_bytes(len(self.keys), self.keys[0][0], self.block_size)

    def write(self, slots: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Per layer [kv_heads, T, head_dim] keys and values into `slots` [T]."""
        for layer, (k, v) in enumerate(zip(keys, values, strict=True)):
            self.keys[layer].index_copy_(0, slots, k.transpose(0, 1).to(self.keys[layer].dtype))
            self.values[layer].index_copy_(0, slots, v.transpose(0, 1).to(self.values[layer].dtype))


def block_bytes(num_layers: int, slot: torch.Tensor, block_size: int) -> int:
    """Keys and values of one block in every layer; `slot` is one slot of one layer [kv_heads, head_dim]."""
    return 2 * num_layers * block_size * slot.nbytes


def pool_blocks(
    fp: BackboneFingerprint, num_layers: int, block_size: int, dtype: torch.dtype, budget_bytes: int
) -> int:
    """How many blocks `budget_bytes` holds."""
    per_block = block_bytes(num_layers, torch.empty((fp.num_key_value_heads, fp.head_dim), dtype=dtype), block_size)
    num_blocks = budget_bytes // per_block
    if num_blocks < 1:
        raise ValueError(
            f"expected room for at least one KV block of {block_size} tokens ({per_block} bytes); "
            f"found {budget_bytes} bytes for the KV pool"
        )
    return num_blocks


def slots_of(block_ids: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    """[num_tokens]: the slot of each of the first `num_tokens` tokens held in these blocks, in order."""
    blocks = torch.tensor(block_ids, dtype=torch.long, device=HOST)
    return (blocks[:, None] * block_size + torch.arange(block_size, device=HOST)).flatten()[:num_tokens]


def block_slots(block_ids: list[list[int]], block_size: int) -> torch.Tensor:
    """[B, blocks * size]: the slots of each row's blocks in order (rows padded with block 0, at least one). The
    ids go to torch as one flat list, placed by a mask: padding nested lists in Python cost 3x as much (1.1 ms
    against 0.4 at 256 rows of 2-40 blocks)."""
    lengths = torch.tensor([len(ids) for ids in block_ids], device=HOST)  # [B]
    width = max(1, int(lengths.max()))
    table = torch.zeros(len(block_ids), width, dtype=torch.long, device=HOST)  # [B, blocks]
    flat = torch.tensor(list(chain.from_iterable(block_ids)), dtype=torch.long, device=HOST)  # [sum of blocks]
    table[torch.arange(width, device=HOST)[None] < lengths[:, None]] = flat
    return (table[:, :, None] * block_size + torch.arange(block_size, device=HOST)).flatten(1)


def long_tensor(values: Iterable[int]) -> torch.Tensor:
    """[n] int64 on the host, as `torch.tensor(values)` makes it but without its conversion element by element: the
    values packed into an array and its buffer taken as it is (some 3 µs for 256 values against 12-24)."""
    return from_array(array("q", values), torch.long)


def double_tensor(values: Iterable[float]) -> torch.Tensor:
    """[n] float64 on the host, as `long_tensor` makes int64 ones."""
    return from_array(array("d", values), torch.float64)


def from_array(packed: array, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[type-arg]
    return torch.frombuffer(packed, dtype=dtype) if packed else torch.empty(0, dtype=dtype, device=HOST)


def to_device(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Host-built tensors of one dtype (a step's int64 index tensors, the sampler's parameters) on `device` in one
    copy: packed into one buffer, pinned on CUDA so the copy does not block the host, and viewed back into their
    shapes there. On the host: themselves."""
    if device.type == HOST.type:
        return tensors
    if len({tensor.dtype for tensor in tensors}) > 1:
        raise TypeError(f"expected tensors of one dtype; found {sorted({str(t.dtype) for t in tensors})}")
    packed = torch.cat([tensor.reshape(-1) for tensor in tensors])  # [sum of numels]
    if device.type == "cuda":
        packed = packed.pin_memory()
    copied = packed.to(device, non_blocking=True)
    parts = copied.split([tensor.numel() for tensor in tensors])
    return [part.view(tensor.shape) for part, tensor in zip(parts, tensors, strict=True)]
