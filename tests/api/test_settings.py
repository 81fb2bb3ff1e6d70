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
    monkeypatch.setenv("PROMPTSERVE_TORCH_THREADS", "1")
    monkeypatch.setenv("PROMPTSERVE_PREFILL_SPLIT_TOKENS", "0")
    config = Settings().engine_config()
    assert (config.torch_threads, config.prefill_split_tokens) == (1, 0)
    monkeypatch.setenv("PROMPTSERVE_TORCH_THREADS", "")
    monkeypatch.setenv("PROMPTSERVE_PREFILL_SPLIT_TOKENS", "")
    config = Settings().engine_config()
    assert (config.torch_threads, config.prefill_split_tokens) == (None, None)
