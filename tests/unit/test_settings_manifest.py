"""Settings loading (YAML + .env + environment, unknown keys rejected) and fragment manifests."""

from __future__ import annotations

from pathlib import Path, PurePath

import pytest

from voxcore.core.domain.fragments import ManifestError, parse_manifest
from voxcore.core.ports.errors import ConfigurationError
from voxcore.entrypoints.container import redis_config_from
from voxcore.entrypoints.settings import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]


def test_defaults_without_file() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.redis.url is None and not settings.redis.explicitly_located
    assert settings.cache.tts_ttl_seconds == 7 * 24 * 3600


def test_shipped_example_config_is_valid() -> None:
    settings = load_settings(REPO / "configs" / "config.yml", env={})
    assert settings.redis.socket_timeout > 0


def test_yaml_then_dotenv_then_environment(tmp_path: Path) -> None:
    cfg = tmp_path / "voxcore.yml"
    cfg.write_text("redis:\n  host: yaml-host\n  port: 7000\ncache:\n  key_prefix: 'app:'\n")
    (tmp_path / ".env").write_text("REDIS_HOST=dotenv-host\nVOXCORE_CACHE__TTS_TTL_SECONDS=60\n")
    settings = load_settings(cfg, env={"REDIS_PORT": "7001"})
    assert settings.redis.host == "dotenv-host"
    assert settings.redis.port == 7001
    assert settings.cache.key_prefix == "app:"
    assert settings.cache.tts_ttl_seconds == 60
    assert settings.redis.explicitly_located


def test_redis_url_and_password_reach_redis_config() -> None:
    settings = load_settings(env={"REDIS_URL": "redis://:secret@10.1.2.3:6390/2", "REDIS_PASSWORD": "pw"})
    config = redis_config_from(settings)
    assert config.url == "redis://:secret@10.1.2.3:6390/2"
    assert config.password == "pw"
    assert "secret" not in config.describe() and "10.1.2.3:6390" in config.describe()
    assert "pw" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("redis:\n  hots: x\n", "redis.hots"),
        ("bogus: 1\n", "bogus"),
        ("cache:\n  tts_ttl_seconds: -5\n", "tts_ttl_seconds"),
        ("redis: [1, 2]\n", "redis"),
        ("- a\n- b\n", "mapping"),
        ("redis: {port: 'abc'}\n", "port"),
        ("redis:\n  port: [\n", "not valid YAML"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text(text)
    with pytest.raises(ConfigurationError, match=message):
        load_settings(cfg, env={})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot read config file"):
        load_settings(tmp_path / "nope.yml", env={})


def test_unknown_env_setting_rejected() -> None:
    with pytest.raises(ConfigurationError, match="cache.nope"):
        load_settings(env={"VOXCORE_CACHE__NOPE": "1"})


def test_manifest_parsing() -> None:
    specs = parse_manifest(
        {
            "fragments": [
                {"key": "intro", "file": "a.wav", "transcript": "Ваша"},
                {"key": "static:b", "file": "/x/b.wav"},
            ]
        },
        PurePath("/m"),
    )
    assert [(s.key, str(s.file), s.transcript) for s in specs] == [
        ("static:intro", "/m/a.wav", "Ваша"),
        ("static:b", "/x/b.wav", ""),
    ]


@pytest.mark.parametrize(
    "data",
    [
        {"fragments": "x"},
        [{"file": "a.wav"}],
        [{"key": "a"}],
        [{"key": "a", "file": "a.wav", "extra": 1}],
        [{"key": "a", "file": "a.wav"}, {"key": "static:a", "file": "b.wav"}],
        [5],
    ],
)
def test_bad_manifests(data: object) -> None:
    with pytest.raises(ManifestError):
        parse_manifest(data, PurePath("/m"))
