"""Plain configuration of the engine: each field's default, bounds and help text are declared here once; the API's
settings (server/api/settings.py) read them to make its PROMPTSERVE_* variables and `promptserve serve` flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Le

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
AttentionBackendName = Literal["sdpa", "flex"]
CpuLinears = Literal["auto", "onednn", "torch"]


def setting(default: Any, help: str) -> Any:
    """A field's default and the help text its flag and variable carry."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str | None = setting(None, "local directory or Hugging Face id; unset: the built-in backbone, offline")
    store_dir: str = setting(
        "./store",
        "task store: a directory, or s3://bucket/prefix (endpoint, region and credentials from the AWS_* variables)",
    )
    store_connect_timeout_s: Annotated[float, Gt(0)] = setting(
        3.0, "seconds an S3 store's endpoint has to accept a connection before the request fails"
    )
    store_read_timeout_s: Annotated[float, Gt(0)] = setting(
        10.0, "seconds an S3 store's endpoint has to answer a request once connected"
    )
    device: str = setting("auto", "auto (CUDA when available), cpu, cuda or cuda:N")
    dtype: Dtype = setting("auto", "auto (bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16")
    max_batch_size: Annotated[int, Ge(1)] = setting(32, "rows in the running batch")
    max_batch_tokens: Annotated[int, Ge(1)] | None = setting(
        None,
        "tokens one step computes (every running row's next token, then prefill chunks); "
        "unset: 512 on CPU, 8192 on GPU",
    )
    max_waiting: Annotated[int, Ge(1)] = setting(1024, "waiting requests before 429 (QueueFull)")  # 0 would refuse all
    max_input_tokens: Annotated[int, Ge(1)] = setting(2048, "input tokens per request, after tokenization")
    max_new_tokens_limit: Annotated[int, Ge(1)] = setting(2048, "the largest max_new_tokens accepted")
    max_virtual_tokens: Annotated[int, Ge(1)] = setting(256, "virtual tokens per task")
    max_lora_rank: Annotated[int, Ge(1)] = setting(
        64, "the largest LoRA rank a task may have (its r and every rank_pattern value); larger ones are refused (422)"
    )
    max_adapter_bytes: Annotated[int, Ge(1)] = setting(64 * 1024 * 1024, "size of adapter_model.safetensors")
    max_config_bytes: Annotated[int, Ge(1)] = setting(64 * 1024, "size of adapter_config.json")
    prompt_cache_bytes: Annotated[int, Ge(0)] = setting(
        256 * 1024 * 1024, "device memory for prompt tasks fed as input embeddings (cache_prompt_kv off; LRU)"
    )
    max_loras: Annotated[int, Ge(1)] = setting(
        16, "LoRA and IA3 tasks applied at once: rows of another such task wait until one is no longer held (vLLM's)"
    )
    adapter_cache_bytes: Annotated[int, Ge(0)] = setting(
        256 * 1024 * 1024,
        "device memory for LoRA and IA3 weights (LRU, at most max_loras; what running rows hold stays)",
    )
    max_cpu_loras: Annotated[int, Ge(1)] | None = setting(
        None,
        "LoRA and IA3 task versions kept parsed in host memory (LRU), so one the device pool evicted loads again "
        "without reading the store (vLLM's); at least max_loras; unset: 4 x max_loras",
    )
    kv_cache_bytes: Annotated[int, Ge(1)] | None = setting(
        None,
        "the KV pool, allocated at start; unset: kv_cache_memory_fraction of the GPU memory left after loading and "
        "a profiled worst step, 1 GiB on CPU",
    )
    kv_cache_memory_fraction: Annotated[float, Gt(0), Le(1)] = setting(
        0.8,
        "on a GPU with kv_cache_bytes unset: the KV pool's share of the memory free after loading the model, less "
        "the activation peak of a worst-case step profiled at start; prompt_cache_bytes and adapter_cache_bytes "
        "come out of that share",
    )
    kv_block_size: Annotated[int, Ge(1)] = setting(8, "tokens per KV block (a row wastes half a block on average)")
    attention_backend: AttentionBackendName = setting(
        "sdpa",
        "sdpa (keys gathered per layer, a boolean mask: the reference) or flex (FlexAttention over the KV pool in "
        "place; compiled on CUDA, where kv_block_size must be a multiple of 16; on CPU uncompiled and slower: for "
        "checking only)",
    )
    cpu_linears: CpuLinears = setting(
        "auto",
        "a float32 backbone on the CPU: its linear layers through oneDNN (a packed copy of their weights; faster "
        "where torch's MKL matmul lacks AVX-512 kernels, e.g. AMD EPYC), or torch (torch's own matmul); auto: "
        "oneDNN where one product timed at start runs 1.2x faster and the copy takes at most half the memory left",
    )
    poll_interval_s: Annotated[float, Ge(0)] = setting(
        2.0, "how often tasks written by other processes are picked up (the store's change feed); 0: never"
    )
    store_rescan_s: Annotated[float, Ge(0)] = setting(
        600.0, "while polling, also list the whole store about this often (the change feed's safety net); 0: never"
    )
    trust_remote_code: bool = setting(False, "passed to from_pretrained for models with custom code")
    cache_prompt_kv: bool = setting(
        True,
        "hold each prompt or P-tuning task as its virtual tokens' keys and values, shared by its rows; "
        "off: each row feeds them as input embeddings",
    )
    torch_threads: Annotated[int, Ge(1)] | None = setting(
        None, "torch intra-op threads; unset: torch's default (one per core)"
    )
    self_check: bool = setting(
        True, "before ready: check that the engine decodes like the backbone's own uncached forward"
    )

    def __post_init__(self) -> None:
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            found = f"{self.max_cpu_loras} (the host tier must hold every task the device pool holds)"
            raise SettingError("max_cpu_loras", f"at least max_loras ({self.max_loras})", found)

    @property
    def num_cpu_loras(self) -> int:
        """LoRA and IA3 task versions the store keeps parsed in host memory."""
        return 4 * self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras


class SettingError(ValueError):
    """A setting whose value makes no sense beside another's: `name`, what was expected and what was found."""

    def __init__(self, name: str, expected: str, found: str) -> None:
        super().__init__(f"{name}: expected {expected}; found {found}")
        self.name, self.expected, self.found = name, expected, found


def default_max_batch_tokens(device: str) -> int:
    """A CPU's forward pass costs about its tokens, so small steps keep decode latency low; a GPU wants big ones."""
    return 512 if device == "cpu" else 8192
