"""The LM head's logits in float32 from a half-precision backbone, as vLLM and SGLang's fp32 LM head give them: every
choice made from logits (greedy argmax, sampling, log-probabilities, a scored candidate's rank) then sees float32
logits, not the head's bfloat16 output, whose rounding (1/128 of a logit's size) differs with the batch's kernel and
flips near-ties between one batch and another. The model's own final transforms (Gemma-2's softcap, a logit scale,
BART's final bias) run after the head as before, now on float32.

On CUDA one matmul reads the half-precision weight and writes float32 (`torch.mm(..., out_dtype=torch.float32)`, as
SGLang's fp32 head does since it stopped upcasting the weight); where that kernel is missing (the CPU) the weight is
upcast a slice of the vocabulary at a time, so the head takes at most `CHUNK_ELEMENTS` float32 weights more memory,
never a float32 copy of the whole head (2 GiB for a 128k vocabulary at 4096 wide), and float32 logits [K, V] in place
of the bf16 ones and their float32 copy the engine made before. A float32 backbone is untouched.
"""

from __future__ import annotations

import logging
from types import MethodType

import torch
from torch.nn import functional

logger = logging.getLogger(__name__)

HALF_DTYPES = (torch.bfloat16, torch.float16)
# float32 weights upcast at a time where the device has no half-in, float32-out matmul: 4 MiB, so the slice is still
# in cache when the matmul reads it (one thread of the 2-vCPU EPYC here, a 2048 x 32k head for 32 rows: 137 ms at
# 2^20, 480 ms at 2^24, 43 ms for the stock bf16 head, whose matmul runs on AVX512-BF16; 2048 x 128k for one row:
# 92 ms at 2^20, 66 ms stock)
CHUNK_ELEMENTS = 1 << 20


def install(model: torch.nn.Module) -> bool:
    """Make a half-precision model's linear LM head compute float32 logits; False (nothing done) for a float32 model
    or one without a linear output layer (an encoder). The head stays the same module object (its name, and the
    output layer the store marks as a head, are unchanged): only its `forward` is replaced."""
    head = model.get_output_embeddings()  # type: ignore[operator]
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype not in HALF_DTYPES:
        return False
    direct = has_float32_out_matmul(head.weight)
    head.forward = MethodType(float32_forward if direct else chunked_float32_forward, head)  # type: ignore[method-assign]
    logger.info("LM head: float32 logits from %s weights (%s)", head.weight.dtype, "one matmul" if direct else
                f"the weight upcast {CHUNK_ELEMENTS} elements at a time")  # fmt: skip
    return True


def has_float32_out_matmul(weight: torch.Tensor) -> bool:
    """Whether this device multiplies half-precision matrices into a float32 result in one kernel (CUDA does;
    torch 2.13's CPU has no `aten::mm.dtype`)."""
    probe = torch.ones(1, 1, dtype=weight.dtype, device=weight.device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32)
    except (NotImplementedError, RuntimeError):
        return False
    return True


def float32_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] (half) -> logits [..., V] in float32, the half weight read once."""
    flat = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
    logits = torch.mm(flat, head.weight.t(), out_dtype=torch.float32)  # [N, V]
    if head.bias is not None:
        logits += head.bias.float()
    return logits.reshape(*hidden.shape[:-1], -1)


def chunked_float32_forward(head: torch.nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., H] (half) -> logits [..., V] in float32: the hidden states and each slice of the vocabulary's
    weights upcast (bf16 and fp16 values are exact in float32, so each product is too; sums round in float32)."""
    flat = hidden.reshape(-1, hidden.shape[-1]).float()  # [N, H]
    weight, bias = head.weight, head.bias
    logits = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32, device=flat.device)  # [N, V]
    per_chunk = max(1, CHUNK_ELEMENTS // weight.shape[1])
    for first in range(0, weight.shape[0], per_chunk):
        last = first + per_chunk
        chunk_bias = None if bias is None else bias[first:last].float()
        logits[:, first:last] = functional.linear(flat, weight[first:last].float(), chunk_bias)  # [N, chunk]
    return logits.reshape(*hidden.shape[:-1], -1)
