"""Settings at the edge: the engine's fields (server/engine/config.py declares their defaults, bounds and help) and
the HTTP server's, each read from PROMPTSERVE_<NAME> and given flat (`Settings(max_batch_size=4, port=9000)`).

`settings.engine` is the engine's own EngineConfig, passed down as is: no field is declared twice. Every setting is
also a `promptserve serve` flag (server/cli.py builds them from `setting_specs`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server.engine.config import EngineConfig, SettingError
from server.engine.types import SamplingParams

ENV_PREFIX = "PROMPTSERVE_"
# PROMPTSERVE_* variables that are not the server's settings: the client's server URL, where the built-in
# backbone is cached, and Compose's image and the image's user id (build time); any other is refused at start
OTHER_VARIABLES = frozenset({"PROMPTSERVE_URL", "PROMPTSERVE_CACHE_DIR", "PROMPTSERVE_IMAGE", "PROMPTSERVE_UID"})
ENGINE_FIELDS = {field.name: field for field in dataclasses.fields(EngineConfig)}
MULTIPART_OVERHEAD_BYTES = 64 * 1024  # boundaries and part headers around the two uploaded files
DEFAULT_MAX_NEW_TOKENS = SamplingParams().max_new_tokens


class ConfigurationError(ValueError):
    """A setting the server cannot start with; its message is one line naming the variable or flag."""


class Settings(BaseSettings):
    """Every setting reads PROMPTSERVE_<NAME> from the environment; arguments (the command line's flags) override it."""

    model_config = SettingsConfigDict(extra="forbid")

    engine: EngineConfig = Field(default_factory=EngineConfig)  # given flat: its fields are settings of their own

    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="port to listen on (one worker per process)")
    api_key: SecretStr | None = Field(
        default=None,
        description="keys every route but /health and /metrics needs as 'Authorization: Bearer <key>' "
        "(vLLM's --api-key); several separated by commas",
    )
    admin_token: SecretStr | None = Field(
        default=None,
        description="when set, task writes (PUT and DELETE /v1/tasks) need 'Authorization: Bearer <token>'",
    )
    max_request_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1, description="size of a request body other than an upload (generation JSON)"
    )
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        default="info", description="critical, error, warning, info or debug"
    )
    metrics_max_tasks: int = Field(
        default=100,
        ge=0,
        description="tasks with a task label of their own in /metrics, the first seen; later ones: _other",
    )
    served_model_name: str | None = Field(
        default=None,
        description="the backbone's id on the OpenAI routes (model, /v1/models); unset: the model's own id",
    )
    header_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="a request's headers must all arrive within this, else 408 and the connection closes",
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="each part of a request body must arrive within this of the one before, else 408",
    )
    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="on SIGTERM, running requests have this long to finish; the rest are answered 503",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="a port of its own serving /metrics alone, on host (each Ray replica's, which a PodMonitor "
        "scrapes; 0: any free port); unset: none",
    )
    stall_timeout_s: float = Field(
        default=60.0,
        ge=0,
        description="/health answers 503 once the engine has had work and completed no step for this long "
        "(a hung forward pass); 0: never",
    )
    health_generate_timeout_s: float = Field(
        default=30.0, gt=0, description="/health/generate's one-token request must finish within this (unless busy)"
    )
    enable_prompt_embeds: bool = Field(
        default=False, description="accept prompt_embeds on /v1/completions (vLLM's flag; loaded safely either way)"
    )
    demo_tasks: bool = Field(
        default=True, description="register the demo tasks on first start (built-in backbone, empty store)"
    )

    @model_validator(mode="before")
    @classmethod
    def _nest_engine_fields(cls, data: Any) -> Any:
        """Flat input (variables, flags, arguments): the engine's fields go into `engine`; an empty value is the
        default (Compose passes an unset variable on as one)."""
        if not isinstance(data, dict):
            return data
        data = {name: value for name, value in data.items() if value != ""}
        given = {name: data.pop(name) for name in list(data) if name in ENGINE_FIELDS}
        if given:
            engine = data.get("engine", {})
            base = dataclasses.asdict(engine) if isinstance(engine, EngineConfig) else dict(engine)
            data["engine"] = {**base, **given}
        return data

    @field_validator("engine", mode="before")
    @classmethod
    def _engine_as_given(cls, value: Any) -> Any:
        return dataclasses.asdict(value) if isinstance(value, EngineConfig) else value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, PrefixedEnvironment(settings_cls)

    @property
    def default_max_new_tokens(self) -> int:
        """A request that does not say: 64, or the limit when it is lower."""
        return min(DEFAULT_MAX_NEW_TOKENS, self.engine.max_new_tokens_limit)

    @property
    def api_keys(self) -> tuple[bytes, ...]:
        """The bearer tokens the API-key check accepts (none: the check is off): each key, and the admin token."""
        if self.api_key is None:
            return ()
        keys = [key.strip() for key in self.api_key.get_secret_value().split(",") if key.strip()]
        admin = [] if self.admin_token is None else [self.admin_token.get_secret_value()]
        return tuple(key.encode() for key in keys + admin)

    @property
    def max_upload_bytes(self) -> int:
        """The most a task upload (both parts) may weigh; larger bodies get 413 before they are read."""
        return self.engine.max_adapter_bytes + self.engine.max_config_bytes + MULTIPART_OVERHEAD_BYTES


@dataclass(frozen=True, slots=True)
class SettingSpec:
    """One setting as the command line and the docs show it."""

    name: str
    default: Any
    help: str
    annotation: Any  # the field's type: bool and Literal settings become switches and choices

    @property
    def variable(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def shown_default(self) -> str:
        if self.default is None:
            return "unset"
        if isinstance(self.default, bool):
            return str(self.default).lower()
        return str(self.default)

    def table_row(self) -> str:
        """Its row in the docs' configuration table (a test keeps the two equal)."""
        return f"| `{self.variable}` | `{self.flag}` | `{self.shown_default}` | {self.help} |"


def setting_specs() -> list[SettingSpec]:
    """Every setting: the engine's (help from its field's metadata), then the HTTP server's."""
    hints = typing.get_type_hints(EngineConfig)
    engine = [SettingSpec(f.name, f.default, f.metadata["help"], hints[f.name]) for f in ENGINE_FIELDS.values()]
    server = [
        SettingSpec(name, info.get_default(call_default_factory=True), info.description or "", info.annotation)
        for name, info in Settings.model_fields.items()
        if name != "engine"
    ]
    return engine + server


def setting_names() -> set[str]:
    return set(ENGINE_FIELDS) | set(Settings.model_fields) - {"engine"}


class PrefixedEnvironment(PydanticBaseSettingsSource):
    """PROMPTSERVE_<NAME> for every setting, flat; a PROMPTSERVE_* variable that names none is refused."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the environment as a whole

    def __call__(self) -> dict[str, Any]:
        check_variables(os.environ)
        names = setting_names()
        values = {}
        for variable, value in os.environ.items():
            name = variable.upper().removeprefix(ENV_PREFIX).lower()
            if variable.upper().startswith(ENV_PREFIX) and name in names:
                values[name] = value
        return values


def check_variables(environ: Mapping[str, str]) -> None:
    """ConfigurationError on a PROMPTSERVE_* variable that is no setting, naming the closest one."""
    known = {ENV_PREFIX + name.upper() for name in setting_names()}
    for variable in sorted(environ):
        upper = variable.upper()
        if upper.startswith(ENV_PREFIX) and upper not in known and upper not in OTHER_VARIABLES:
            close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "`promptserve serve --help` lists them"
            raise ConfigurationError(f"{variable}: expected a promptserve setting; found no such setting ({hint})")


def load_settings(given: Mapping[str, Any], named: Callable[[str], str]) -> Settings:
    """Settings from `given` (flags or builder arguments, by setting name) over the environment; a bad value is a
    ConfigurationError naming where it came from: `named(name)` if given, else its variable."""
    try:
        return Settings(**given)
    except ValidationError as error:
        raise ConfigurationError(describe_error(error, given, named)) from None


def describe_error(error: ValidationError, given: Mapping[str, Any], named: Callable[[str], str]) -> str:
    """The first error as one line: `PROMPTSERVE_MAX_BATCH_SIZE: expected a valid integer; found 'abc'`."""
    item = error.errors()[0]
    names = setting_names()
    if isinstance(cause := item.get("ctx", {}).get("error"), SettingError):  # one setting beside another
        where = named(cause.name) if cause.name in given else ENV_PREFIX + cause.name.upper()
        return f"{where}: expected {cause.expected}; found {cause.found}"
    name = next((str(part) for part in reversed(item["loc"]) if part in names), ".".join(map(str, item["loc"])))
    where = named(name) if name in given else ENV_PREFIX + name.upper()
    if item["type"] == "extra_forbidden":
        close = difflib.get_close_matches(name, sorted(names), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return f"{named(name)}: expected a promptserve setting; found no such setting{hint}"
    expected = item["msg"].removeprefix("Input should be ").removeprefix("Value error, ").split(", unable")[0]
    if expected.startswith(("greater", "less")):
        expected = "a value " + expected
    return f"{where}: expected {expected}; found {item.get('input')!r}"
