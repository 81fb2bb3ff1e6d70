"""Plain configuration of the engine; the API's settings build it at the edge and pass it down."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = None  # local directory or hub id; None: the built-in default backbone
    store_dir: str = "./store"  # a directory, or s3://bucket/prefix (endpoint and credentials: AWS_* variables)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | float16 | bfloat16
    max_batch_size: int = 32  # rows in the running batch
    max_batch_tokens: int | None = None  # tokens one step computes (decode tokens + prefill chunks); None: by device
    max_waiting: int = 1024  # bounded waiting queue: beyond it, QueueFull
    max_input_tokens: int = 2048  # after tokenization, without virtual tokens
    max_new_tokens_limit: int = 2048
    max_virtual_tokens: int = 256
    max_adapter_bytes: int = 64 * 1024 * 1024  # adapter_model.safetensors
    max_config_bytes: int = 64 * 1024  # adapter_config.json
    prompt_cache_bytes: int = 256 * 1024 * 1024  # prompt tasks held as input embeddings (cache_prompt_kv off)
    kv_cache_bytes: int | None = None  # the KV pool; None: kv_cache_memory_fraction of free GPU memory, 1 GiB on CPU
    kv_cache_memory_fraction: float = 0.8
    kv_block_size: int = 8  # tokens per KV block: a row wastes half a block on average
    poll_interval_s: float = 2.0  # picks up tasks written by other processes; 0 disables
    trust_remote_code: bool = False
    cache_prompt_kv: bool = True  # prompt/P-tuning tasks held as their virtual tokens' keys and values, shared
    torch_threads: int | None = None  # torch intra-op threads; None: torch's default (one per core)
    self_check: bool = True  # before ready: the engine's tokens equal the backbone's own (server.engine.selfcheck)


def default_max_batch_tokens(device: str) -> int:
    """A CPU's forward pass costs about its tokens, so small steps keep decode latency low; a GPU wants big ones."""
    return 512 if device == "cpu" else 8192
