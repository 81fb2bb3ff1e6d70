"""Settings at the edge (env prefix PROMPTSERVE_); they build the plain EngineConfig passed down to the engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from server.engine.config import EngineConfig
from server.engine.types import SamplingParams

_ENGINE = EngineConfig()
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the two uploaded files
DEFAULT_MAX_NEW_TOKENS = SamplingParams().max_new_tokens


class Settings(BaseSettings):
    """Every field reads PROMPTSERVE_<FIELD> from the environment; command-line flags override it."""

    model_config = SettingsConfigDict(env_prefix="PROMPTSERVE_", extra="ignore")

    # engine
    model: str | None = _ENGINE.model  # None: the built-in default backbone, offline
    store_dir: str = _ENGINE.store_dir  # a directory or s3://bucket/prefix
    device: str = _ENGINE.device
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    max_batch_size: int = Field(default=_ENGINE.max_batch_size, ge=1)
    max_batch_tokens: int | None = Field(default=_ENGINE.max_batch_tokens, ge=1)
    max_waiting: int = Field(default=_ENGINE.max_waiting, ge=0)
    max_input_tokens: int = Field(default=_ENGINE.max_input_tokens, ge=1)
    max_new_tokens_limit: int = Field(default=_ENGINE.max_new_tokens_limit, ge=1)
    max_virtual_tokens: int = Field(default=_ENGINE.max_virtual_tokens, ge=1)
    max_adapter_bytes: int = Field(default=_ENGINE.max_adapter_bytes, ge=1)
    max_config_bytes: int = Field(default=_ENGINE.max_config_bytes, ge=1)
    prompt_cache_bytes: int = Field(default=_ENGINE.prompt_cache_bytes, ge=0)
    poll_interval_s: float = Field(default=_ENGINE.poll_interval_s, ge=0)
    trust_remote_code: bool = _ENGINE.trust_remote_code
    kv_cache_bytes: int | None = Field(default=_ENGINE.kv_cache_bytes, ge=1)
    kv_cache_memory_fraction: float = Field(default=_ENGINE.kv_cache_memory_fraction, gt=0, le=1)
    kv_block_size: int = Field(default=_ENGINE.kv_block_size, ge=1)
    cache_prompt_kv: bool = _ENGINE.cache_prompt_kv
    torch_threads: int | None = Field(default=_ENGINE.torch_threads, ge=1)
    self_check: bool = _ENGINE.self_check

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    admin_token: SecretStr | None = None  # when set, PUT and DELETE need `Authorization: Bearer <token>`
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1)  # any body but an upload (JSON generation requests)
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    metrics_max_tasks: int = Field(default=100, ge=0)  # tasks with a `task` label of their own; later ones: _other
    served_model_name: str | None = None  # the backbone's id on the OpenAI routes; None: the model's own id
    header_timeout_s: float = Field(default=10.0, gt=0)  # a request's headers must all arrive within this (408)
    body_timeout_s: float = Field(default=30.0, gt=0)  # each part of a body within this of the one before (408)
    shutdown_grace_s: float = Field(default=20.0, ge=0)  # on SIGTERM, running requests finish within this, then 503
    enable_prompt_embeds: bool = False  # /v1/completions takes prompt_embeds (vLLM's flag; loaded safely either way)

    # start-up
    demo_tasks: bool = True  # register the built-in demo tasks on first start with an empty store

    @field_validator(
        "model",
        "admin_token",
        "served_model_name",
        "max_batch_tokens",
        "kv_cache_bytes",
        "torch_threads",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def default_max_new_tokens(self) -> int:
        """A request that does not say: 64, or the limit when it is lower."""
        return min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens_limit)

    @property
    def max_upload_bytes(self) -> int:
        """The most a task upload (both parts) may weigh; larger bodies get 413 before they are read."""
        return self.max_adapter_bytes + self.max_config_bytes + MULTIPART_OVERHEAD_BYTES

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            model=self.model,
            store_dir=self.store_dir,
            device=self.device,
            dtype=self.dtype,
            max_batch_size=self.max_batch_size,
            max_batch_tokens=self.max_batch_tokens,
            max_waiting=self.max_waiting,
            max_input_tokens=self.max_input_tokens,
            max_new_tokens_limit=self.max_new_tokens_limit,
            max_virtual_tokens=self.max_virtual_tokens,
            max_adapter_bytes=self.max_adapter_bytes,
            max_config_bytes=self.max_config_bytes,
            prompt_cache_bytes=self.prompt_cache_bytes,
            poll_interval_s=self.poll_interval_s,
            trust_remote_code=self.trust_remote_code,
            kv_cache_bytes=self.kv_cache_bytes,
            kv_cache_memory_fraction=self.kv_cache_memory_fraction,
            kv_block_size=self.kv_block_size,
            cache_prompt_kv=self.cache_prompt_kv,
            torch_threads=self.torch_threads,
            self_check=self.self_check,
        )
