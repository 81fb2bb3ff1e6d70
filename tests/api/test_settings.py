"""Settings read PROMPTSERVE_*, hold the engine's own EngineConfig, and refuse what they cannot use in one line."""

from __future__ import annotations

import dataclasses

import pytest

from server.api.settings import ConfigurationError, Settings, load_settings, setting_names, setting_specs
from server.engine.config import EngineConfig


def as_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def test_settings_defaults_match_engine_config() -> None:
    assert Settings().engine == EngineConfig()


def test_every_engine_field_is_a_setting_declared_once() -> None:
    engine_fields = {field.name for field in dataclasses.fields(EngineConfig)}
    assert engine_fields <= setting_names()
    assert not engine_fields & set(Settings.model_fields), "an engine field re-declared in Settings"
    names = [spec.name for spec in setting_specs()]
    assert len(names) == len(set(names)) and set(names) == setting_names()
    assert all(spec.help for spec in setting_specs()), "a setting without help"


def test_settings_read_prefixed_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_MODEL", "/models/tiny")
    monkeypatch.setenv("PROMPTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PROMPTSERVE_ADMIN_TOKEN", "t0k")
    settings = Settings()
    assert (settings.engine.model, settings.engine.max_batch_size) == ("/models/tiny", 7)
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "t0k"


def test_arguments_override_the_environment_field_by_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("PROMPTSERVE_KV_BLOCK_SIZE", "16")
    settings = Settings(max_batch_size=3)
    assert (settings.engine.max_batch_size, settings.engine.kv_block_size) == (3, 16)


def test_settings_empty_env_model_means_default_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_MODEL", "")
    monkeypatch.setenv("PROMPTSERVE_ADMIN_TOKEN", "")
    assert (Settings().engine.model, Settings().admin_token) == (None, None)


def test_settings_token_hidden_in_repr() -> None:
    assert "t0k" not in repr(Settings(admin_token="t0k"))


def test_settings_upload_limit_covers_both_parts() -> None:
    settings = Settings(max_adapter_bytes=1000, max_config_bytes=100)
    assert settings.max_upload_bytes > 1100


def test_engine_tuning_settings_reach_the_engine_and_empty_means_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    tuning = {"TORCH_THREADS": "1", "MAX_BATCH_TOKENS": "64", "KV_CACHE_BYTES": "1048576", "KV_BLOCK_SIZE": "8"}
    for name, value in tuning.items():
        monkeypatch.setenv(f"PROMPTSERVE_{name}", value)
    config = Settings().engine
    assert (config.torch_threads, config.max_batch_tokens, config.kv_cache_bytes, config.kv_block_size) == (
        1,
        64,
        1 << 20,
        8,
    )
    for name in ("TORCH_THREADS", "MAX_BATCH_TOKENS", "KV_CACHE_BYTES"):
        monkeypatch.setenv(f"PROMPTSERVE_{name}", "")
    config = Settings().engine
    assert (config.torch_threads, config.max_batch_tokens, config.kv_cache_bytes) == (None, None, None)


def test_misspelt_variable_refused_naming_the_closest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_MAX_BATCH_SIZ", "8")
    with pytest.raises(ConfigurationError) as refused:
        Settings()
    assert str(refused.value) == (
        "PROMPTSERVE_MAX_BATCH_SIZ: expected a promptserve setting; found no such setting "
        "(did you mean PROMPTSERVE_MAX_BATCH_SIZE?)"
    )


def test_the_clients_and_the_images_variables_are_not_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("URL", "CACHE_DIR", "IMAGE", "UID"):
        monkeypatch.setenv(f"PROMPTSERVE_{name}", "x")
    assert Settings().engine == EngineConfig()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MAX_BATCH_SIZE", "abc", "PROMPTSERVE_MAX_BATCH_SIZE: expected a valid integer; found 'abc'"),
        ("MAX_BATCH_SIZE", "0", "PROMPTSERVE_MAX_BATCH_SIZE: expected a value greater than or equal to 1; found '0'"),
        ("MAX_WAITING", "0", "PROMPTSERVE_MAX_WAITING: expected a value greater than or equal to 1; found '0'"),
        ("DTYPE", "int3", "PROMPTSERVE_DTYPE: expected 'auto', 'float32', 'float16' or 'bfloat16'; found 'int3'"),
        ("PORT", "http", "PROMPTSERVE_PORT: expected a valid integer; found 'http'"),
        ("SELF_CHECK", "maybe", "PROMPTSERVE_SELF_CHECK: expected a valid boolean; found 'maybe'"),
    ],
)
def test_a_bad_value_names_its_variable_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"PROMPTSERVE_{variable}", value)
    with pytest.raises(ConfigurationError) as refused:
        load_settings({}, as_flag)
    assert str(refused.value) == message


def test_a_bad_argument_names_its_flag_not_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMPTSERVE_MAX_WAITING", "5")
    with pytest.raises(ConfigurationError, match=r"^--max-waiting: expected a value greater than or equal to 1"):
        load_settings({"max_waiting": "-1"}, as_flag)


def test_a_host_tier_smaller_than_the_device_pool_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM refuses max_cpu_loras < max_loras: the host tier must hold every LoRA task the device pool holds."""
    expected = "expected at least max_loras (16); found 8 (the host tier must hold every task the device pool holds)"
    with pytest.raises(ConfigurationError) as refused:
        load_settings({"max_cpu_loras": "8"}, as_flag)
    assert str(refused.value) == f"--max-cpu-loras: {expected}"
    monkeypatch.setenv("PROMPTSERVE_MAX_CPU_LORAS", "8")
    with pytest.raises(ConfigurationError, match=r"^PROMPTSERVE_MAX_CPU_LORAS: expected at least max_loras \(16\)"):
        load_settings({}, as_flag)
    settings = load_settings({"max_loras": "2"}, as_flag)
    assert settings.engine.max_cpu_loras == 8 and settings.engine.num_cpu_loras == 8
    monkeypatch.delenv("PROMPTSERVE_MAX_CPU_LORAS")
    assert load_settings({"max_loras": "3"}, as_flag).engine.num_cpu_loras == 12  # unset: 4 x max_loras


def test_an_unknown_argument_is_refused_naming_the_closest_setting() -> None:
    with pytest.raises(ConfigurationError, match=r"^--store-dri: .* \(did you mean store_dir\?\)$"):
        load_settings({"store_dri": "x"}, as_flag)
