"""Settings read PROMPTSERVE_* and build the engine's plain config."""

from __future__ import annotations

import pytest

from server.api.settings import Settings
from server.engine.config import EngineConfig


def test_settings_defaults_match_engine_config() -> None:
    assert Settings().engine_config() == EngineConfig()


def test_settings_read_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_MODEL", "/models/tiny")
    monkeypatch.setenv("PROMPTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PROMPTSERVE_ADMIN_TOKEN", "t0k")
    settings = Settings()
    assert (settings.engine_config().model, settings.engine_config().max_batch_size) == ("/models/tiny", 7)
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "t0k"


def test_settings_empty_env_model_means_default_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_MODEL", "")
    monkeypatch.setenv("PROMPTSERVE_ADMIN_TOKEN", "")
    assert (Settings().model, Settings().admin_token) == (None, None)


def test_settings_token_hidden_in_repr() -> None:
    assert "t0k" not in repr(Settings(admin_token="t0k"))


def test_settings_upload_limit_covers_both_parts() -> None:
    settings = Settings(max_adapter_bytes=1000, max_config_bytes=100)
    assert settings.max_upload_bytes > 1100


def test_engine_tuning_settings_reach_the_engine_and_empty_means_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    tuning = {"TORCH_THREADS": "1", "MAX_BATCH_TOKENS": "64", "KV_CACHE_BYTES": "1048576", "KV_BLOCK_SIZE": "8"}
    for name, value in tuning.items():
        monkeypatch.setenv(f"PROMPTSERVE_{name}", value)
    config = Settings().engine_config()
    assert (config.torch_threads, config.max_batch_tokens, config.kv_cache_bytes, config.kv_block_size) == (
        1,
        64,
        1 << 20,
        8,
    )
    for name in ("TORCH_THREADS", "MAX_BATCH_TOKENS", "KV_CACHE_BYTES"):
        monkeypatch.setenv(f"PROMPTSERVE_{name}", "")
    config = Settings().engine_config()
    assert (config.torch_threads, config.max_batch_tokens, config.kv_cache_bytes) == (None, None, None)
