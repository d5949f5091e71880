"""``OpenAIConfig`` validation, secrets kept out of logs, and the derived telemetry attributes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from voxcore.adapters.openai import OpenAIConfig
from voxcore.core.ports.errors import ConfigurationError


def test_defaults_are_valid() -> None:
    config = OpenAIConfig()
    assert config.base_url == "https://api.openai.com/v1"
    assert config.api_key is None and config.http2 is True
    assert (config.connect_timeout_s, config.write_timeout_s, config.read_timeout_s) == (3.0, 10.0, 30.0)
    assert (config.pool_timeout_s, config.first_token_timeout_s) == (5.0, 15.0)
    assert (config.keepalive_expiry_s, config.warmup_interval_s) == (90.0, 20.0)
    assert config.warmup_endpoint == "/models" and config.warmup_completion is False
    assert config.warmup_model == "gpt-4o-mini" and config.structured_output == "auto"
    assert config.stream_usage is True and config.max_output_tokens == 512
    assert config.temperature == 0.3 and config.provider_name == "openai"


def test_frozen() -> None:
    config = OpenAIConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.api_key = "sk-x"  # type: ignore[misc]


def test_secrets_stay_out_of_repr_and_describe() -> None:
    config = OpenAIConfig(api_key="sk-very-secret-key")
    assert "sk-very-secret-key" not in repr(config)
    described = config.describe()
    assert "sk-very-secret-key" not in described
    assert "api_key=set" in described and "https://api.openai.com/v1" in described
    assert "api_key=none" in OpenAIConfig().describe()


def test_server_address_and_port() -> None:
    assert (OpenAIConfig().server_address, OpenAIConfig().server_port) == ("api.openai.com", 443)
    local = OpenAIConfig(base_url="http://127.0.0.1:8089/v1")
    assert (local.server_address, local.server_port) == ("127.0.0.1", 8089)
    assert OpenAIConfig(base_url="http://llm.internal/v1").server_port == 80


def test_a_local_server_needs_no_key() -> None:
    assert OpenAIConfig(base_url="http://localhost:8000/v1", api_key=None).api_key is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"connect_timeout_s": 0}, "connect_timeout_s must be positive"),
        ({"read_timeout_s": -1.0}, "read_timeout_s must be positive"),
        ({"write_timeout_s": float("nan")}, "write_timeout_s must be a number"),
        ({"pool_timeout_s": float("inf")}, "pool_timeout_s must be a number"),
        ({"first_token_timeout_s": True}, "first_token_timeout_s must be a number"),
        ({"first_token_timeout_s": "5"}, "first_token_timeout_s must be a number"),
        ({"warmup_interval_s": 0.0}, "warmup_interval_s must be positive"),
        ({"keepalive_expiry_s": 20.0}, "keepalive_expiry_s .* must be longer than warmup_interval_s"),
        ({"keepalive_expiry_s": 5.0, "warmup_interval_s": 10.0}, "must be longer than"),
        ({"base_url": "ftp://example.com/v1"}, "must start with http:// or https://"),
        ({"base_url": "api.openai.com/v1"}, "must start with http:// or https://"),
        ({"base_url": ""}, "base_url must be a non-empty URL"),
        ({"base_url": "https:///v1"}, "has no host"),
        ({"base_url": "https://example.com/v1?x=1"}, "query or fragment"),
        ({"base_url": "https://user:pw@example.com/v1"}, "must not embed credentials"),
        ({"base_url": "https://example.com:99999/v1"}, "is not a valid URL"),
        ({"api_key": ""}, "api_key must be a non-empty string or None"),
        ({"http2": "yes"}, "http2 must be a bool"),
        ({"warmup_endpoint": ""}, "warmup_endpoint must be a non-empty path"),
        ({"warmup_endpoint": "https://other/models"}, "must be relative to base_url"),
        ({"warmup_model": " "}, "warmup_model must be a non-empty string"),
        ({"structured_output": "xml"}, "structured_output must be one of auto, json_schema, json_object"),
        ({"max_output_tokens": 0}, "max_output_tokens must be a positive integer"),
        ({"max_output_tokens": 1.5}, "max_output_tokens must be a positive integer"),
        ({"temperature": 2.5}, "temperature must be within 0..2"),
        ({"temperature": -0.1}, "temperature must be within 0..2"),
        ({"max_keepalive_connections": 9, "max_connections": 8}, "must not exceed max_connections"),
        ({"provider_name": ""}, "provider_name must be a non-empty string"),
    ],
)
def test_invalid_values_raise_configuration_error(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        OpenAIConfig(**overrides)


def test_short_warmup_for_tests_is_valid() -> None:
    config = OpenAIConfig(warmup_interval_s=0.05, keepalive_expiry_s=5.0, first_token_timeout_s=0.2)
    assert config.warmup_interval_s == 0.05
