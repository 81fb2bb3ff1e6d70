"""Prompts given as embeddings (vLLM's `prompt_embeds`): a caller's `torch.save`d tensor, loaded safely.

The bytes come from the network: they are loaded with `weights_only=True` (no pickle code runs: a payload that
needs anything but tensors is refused), after a size cap, and the tensor is checked against the backbone (a
floating dtype, [tokens, hidden], finite) before it goes near the model.
"""

from __future__ import annotations

import io
import pickle

import torch

from server.engine.errors import InvalidPrompt, first_line

SAVE_OVERHEAD_BYTES = 64 * 1024  # torch.save's zip container and pickle around the tensor's data
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def max_embeds_bytes(max_tokens: int, hidden_size: int) -> int:
    """The most a `torch.save`d [max_tokens, hidden] float32 tensor can weigh: larger payloads are refused unread."""
    return max_tokens * hidden_size * 4 + SAVE_OVERHEAD_BYTES


def load_prompt_embeds(data: bytes, hidden_size: int, max_tokens: int) -> torch.Tensor:
    """[T, H] on the CPU, float; raises InvalidPrompt for anything else."""
    limit = max_embeds_bytes(max_tokens, hidden_size)
    if len(data) > limit:
        raise InvalidPrompt(f"prompt_embeds: expected at most {limit} bytes; found {len(data)}")
    try:
        tensor = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # the weights-only unpickler met code to run: refused, never run
        raise InvalidPrompt(
            "prompt_embeds: expected a torch.save'd tensor; found a payload that would run code to load "
            "(refused, not run)"
        ) from None
    except Exception as exc:  # a corrupt or foreign archive
        raise InvalidPrompt(
            f"prompt_embeds: expected a torch.save'd tensor; found bytes torch cannot read ({first_line(exc, 120)})"
        ) from None
    check_embeds(tensor, hidden_size, max_tokens)
    return tensor


def check_embeds(tensor: object, hidden_size: int, max_tokens: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.layout is not torch.strided:
        raise InvalidPrompt(f"prompt_embeds: expected a dense tensor; found {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise InvalidPrompt(f"prompt_embeds: expected float32, float16 or bfloat16; found {tensor.dtype}")
    if tensor.dim() != 2 or tensor.shape[1] != hidden_size or not 1 <= tensor.shape[0] <= max_tokens:
        raise InvalidPrompt(
            f"prompt_embeds: expected shape [tokens, {hidden_size}] with 1 to {max_tokens} tokens; found "
            f"{list(tensor.shape)}"
        )
    if not bool(tensor.isfinite().all()):
        raise InvalidPrompt("prompt_embeds: expected finite values; found NaN or infinity")
