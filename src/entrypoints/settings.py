"""Validated settings: YAML file (explicit path) + ``.env`` + process environment, unknown keys rejected.

Precedence, lowest to highest: built-in defaults, the YAML file, the ``.env`` file, the process
environment. Environment names:

* ``REDIS_URL`` or ``REDIS_HOST``/``REDIS_PORT``/``REDIS_DB``/``REDIS_PASSWORD`` (SPEC-B);
* ``VOXCORE_<SECTION>__<KEY>`` for any other setting, e.g. ``VOXCORE_CACHE__TTS_TTL_SECONDS=3600``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from dotenv import dotenv_values
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, SecretStr, ValidationError

from voxcore.core.ports.errors import ConfigurationError

_STRICT = ConfigDict(extra="forbid", frozen=True)
_REDIS_ENV = {
    "REDIS_URL": "url",
    "REDIS_HOST": "host",
    "REDIS_PORT": "port",
    "REDIS_DB": "db",
    "REDIS_PASSWORD": "password",
}
_PREFIX = "VOXCORE_"


class RedisSettings(BaseModel):
    """Where Redis is and how the client behaves (see ``RedisConfig``)."""

    model_config = _STRICT

    url: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=6379, ge=1, le=65535)
    db: int = Field(default=0, ge=0)
    password: SecretStr | None = None
    socket_timeout: PositiveFloat = 1.0
    socket_connect_timeout: PositiveFloat = 0.5
    max_connections: PositiveInt = 32
    pool_timeout: PositiveFloat = 1.0
    retries: int = Field(default=1, ge=0, le=10)
    health_check_interval: int = Field(default=30, ge=0)

    @property
    def explicitly_located(self) -> bool:
        """True when a source set where Redis is (so tools must not pick a server themselves)."""
        return bool(self.model_fields_set & {"url", "host", "port"})


class CacheSettings(BaseModel):
    """Behaviour of the audio/text cache."""

    model_config = _STRICT

    key_prefix: str = ""
    tts_ttl_seconds: PositiveInt = 7 * 24 * 3600
    stream_first_batch: int = Field(default=4, ge=1, le=1000)
    prev_grace_seconds: PositiveInt = 30
    breaker_base_window_ms: PositiveFloat = 250.0
    breaker_max_window_ms: PositiveFloat = 2000.0


class LoggingSettings(BaseModel):
    """JSON logging installed by the container (``configure: false`` leaves the host's set-up alone)."""

    model_config = _STRICT

    configure: bool = True
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class Settings(BaseModel):
    """All of voxcore's settings."""

    model_config = _STRICT

    redis: RedisSettings = Field(default_factory=RedisSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)


def load_settings(
    config_path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    dotenv_path: str | os.PathLike[str] | None = None,
) -> Settings:
    """Build :class:`Settings` from a YAML file, a ``.env`` file and the environment.

    Args:
        config_path: The YAML file; ``None`` means defaults + environment only. It must exist.
        env: The environment to read (``os.environ`` by default).
        dotenv_path: A ``.env`` file; by default the ``.env`` beside ``config_path`` if there is
            one. Never looked up in the current working directory.

    Raises:
        ConfigurationError: unreadable file, invalid YAML, unknown keys or invalid values; the
            message names the file and the setting.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if config_path is not None:
        path = Path(config_path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigurationError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"config file {path} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"config file {path} must hold a mapping at the top level")
        data = loaded
        if dotenv_path is None and (path.parent / ".env").is_file():
            dotenv_path = path.parent / ".env"
    variables: dict[str, str] = {}
    if dotenv_path is not None:
        if not Path(dotenv_path).is_file():
            raise ConfigurationError(f".env file {dotenv_path} does not exist")
        variables.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    variables.update(os.environ if env is None else env)
    _apply_env(data, variables)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors(include_url=False)
        )
        raise ConfigurationError(f"invalid settings ({source} + environment): {problems}") from exc


def _apply_env(data: dict[str, Any], variables: Mapping[str, str]) -> None:
    def section(name: str) -> dict[str, Any]:
        current = data.setdefault(name, {})
        if not isinstance(current, dict):
            raise ConfigurationError(f"settings section {name!r} must be a mapping")
        return current

    for var, field_name in _REDIS_ENV.items():
        value = variables.get(var)
        if value:
            section("redis")[field_name] = value
    for var, value in variables.items():
        if var.startswith(_PREFIX) and "__" in var:
            section_name, _, key = var[len(_PREFIX) :].lower().partition("__")
            if section_name and key:
                section(section_name)[key] = value
