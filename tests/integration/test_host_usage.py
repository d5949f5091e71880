"""The container used exactly as the README shows a host service using it."""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import pytest

from tests.conftest import RedisTarget
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.runtime import maybe_await
from voxcore.entrypoints.settings import load_settings
from voxcore.simulator import OpenAISimulator

REPO = Path(__file__).resolve().parents[2]


def readme_host_snippet() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Using it from a host service", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README lost its host-usage example"
    return match.group(1)


async def test_readme_host_example_runs_verbatim(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    config = tmp_path / "voxcore.yml"
    config.write_text(f"redis:\n  url: {redis_target.url}\ncache:\n  key_prefix: '{key_prefix}'\n")
    snippet = readme_host_snippet()
    assert 'Container(config_path="/srv/app/voxcore.yml")' in snippet
    code = snippet.replace("/srv/app/voxcore.yml", str(config))
    async with OpenAISimulator(api_key="sk-readme") as sim:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "VOXCORE_", "OPENAI_"))}
        env |= {"OPENAI_BASE_URL": sim.base_url, "OPENAI_API_KEY": "sk-readme"}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert out.decode().splitlines() == [
        "Клиент спрашивал о тарифах.",
        "Вы сказали: Сколько стоит страховка квартиры?",
    ]
    # The host's logging (basicConfig on stderr) got voxcore's events: the library installs no handler
    logged = err.decode()
    assert "INFO:voxcore.adapters.redis.cache:redis_connected" in logged
    assert "INFO:voxcore.llm.manager:user_turn_finish" in logged


async def test_container_wires_one_cache_and_closes_it(redis_target: RedisTarget, key_prefix: str) -> None:
    settings = load_settings(env={"REDIS_URL": redis_target.url, "VOXCORE_CACHE__KEY_PREFIX": key_prefix})
    container = Container(settings=settings)
    await container.init_resources()
    cache = container.cache()
    assert cache is container.cache()  # one per container (process)
    assert cache.key_prefix == key_prefix
    assert await cache.set_text("summary:session:c", "ok", 10)
    assert await cache.get_text("summary:session:c") == "ok"
    shutdown = container.shutdown_resources()
    if shutdown is not None:
        await shutdown
    assert cache._redis is None  # closed


def test_container_reports_bad_config_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("redis:\n  prot: 1\n")
    from voxcore.core.ports.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="redis.prot"):
        Container(config_path=str(bad)).settings()


async def test_voice_service_off_by_default_and_checked_when_on(
    redis_target: RedisTarget, key_prefix: str
) -> None:
    from voxcore.core.ports.errors import ConfigurationError as ConfigError

    env = {
        "REDIS_URL": redis_target.url,
        "VOXCORE_CACHE__KEY_PREFIX": key_prefix,
        "VOXCORE_LOGGING__CONFIGURE": "false",
    }
    off = Container(settings=load_settings(env=env))
    await off.init_resources()
    assert await off.voice_service() is None  # a cache/LLM-only host needs no TTS engine
    await off.shutdown_resources()

    # an OpenAI voice for a remote provider without a key: start-up says what is missing
    on = Container(
        settings=load_settings(
            env=env
            | {
                "VOXCORE_VOICE__ENABLED": "true",
                "VOXCORE_VOICE__DEFAULT_AGENT__ENGINE": "openai",
                "VOXCORE_VOICE__DEFAULT_AGENT__VOICE": "alloy",
            }
        )
    )
    with pytest.raises(ConfigError, match="OPENAI_API_KEY"):
        await on.init_resources()
    # after a failed start only sync resources may be up: then there is nothing to await
    await maybe_await(on.shutdown_resources())


async def test_voice_service_speaks_and_caches_through_the_container(
    redis_target: RedisTarget, key_prefix: str
) -> None:
    import shutil

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (.ci/run installs it)")
    env = {
        "REDIS_URL": redis_target.url,
        "VOXCORE_CACHE__KEY_PREFIX": key_prefix,
        "VOXCORE_LOGGING__CONFIGURE": "false",
        "VOXCORE_VOICE__ENABLED": "true",
    }
    container = Container(settings=load_settings(env=env))
    await container.init_resources()
    try:
        voice = await container.voice_service()
        first = await voice.synthesize_speech("agent-1", "двенадцать тысяч пятьсот", "user-1")
        assert first.success and first.audio and not first.from_cache
        second = await voice.synthesize_speech("agent-1", "двенадцать  тысяч пятьсот", "user-1")
        assert second.success and second.from_cache and second.audio == first.audio
    finally:
        await container.shutdown_resources()


async def test_host_plays_a_hybrid_reply_through_the_container(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    import shutil

    from voxcore.core.domain.audio import AudioFormat, plan_chunks, split_pcm
    from voxcore.core.domain.russian import hybrid_amount_playlist

    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (.ci/run installs it)")
    manifest = tmp_path / "fragments.yml"
    manifest.write_text(
        "fragments:\n  - {key: static:intro, file: intro.wav, transcript: Ваша стоимость составляет}\n"
    )
    config = tmp_path / "voxcore.yml"
    config.write_text(
        f"redis: {{url: '{redis_target.url}'}}\ncache: {{key_prefix: '{key_prefix}'}}\n"
        "logging: {configure: false}\n"
        "voice:\n  default_agent: {engine: espeak-ng, voice: ru, audio_format: {sample_rate: 16000}}\n"
        "  hybrid: {manifest_path: fragments.yml}\n"
    )
    container = Container(config_path=str(config))
    await container.init_resources()
    try:
        cache = container.cache()
        fmt = AudioFormat(16_000, 1, 2)
        rubles = bytes(range(256)) * 25  # 6400 bytes = 200 ms
        assert await cache.set_audio_fragment(
            "static:currency_rub_many", split_pcm(rubles, plan_chunks(fmt, 20)), fmt
        )
        responder = await container.open_hybrid_responder()
        # static:intro is missing: spoken from the manifest's transcript; so are the number words
        # (the pack is not loaded: its transcripts are always known); "рублей" comes from the cache.
        audio = b"".join([chunk async for chunk in responder.play(hybrid_amount_playlist(12_500))])
        # The fragment plays as stored, but for its first few ms (ramped from the previous sample).
        assert audio.endswith(rubles[256:]) and len(audio) > len(rubles) + 16_000  # speech before it
        metrics = responder.last_metrics
        assert metrics is not None and metrics.hits == 1 and metrics.time_to_first_audio_ms is not None
        assert metrics.outcome == "degraded" and len(metrics.degraded_items) == 4  # intro + 3 words
        assert metrics.voices == ("espeak-ng/ru", "static")
        await responder.shutdown()  # the synthesized parts are stored before this returns
        again = await container.open_hybrid_responder()
        replay = b"".join([chunk async for chunk in again.play(hybrid_amount_playlist(12_500))])
        assert replay == audio and again.last_metrics is not None and again.last_metrics.misses == 0
        await again.shutdown()
    finally:
        await container.shutdown_resources()


async def test_broken_prompts_fail_at_start_not_at_the_first_call(
    redis_target: RedisTarget, key_prefix: str, tmp_path: Path
) -> None:
    from voxcore.core.ports.errors import ConfigurationError as ConfigError

    (tmp_path / "prompts.yml").write_text("system_prompt: hi\n")  # two prompts missing
    config = tmp_path / "voxcore.yml"
    config.write_text(
        f"redis: {{url: '{redis_target.url}'}}\ncache: {{key_prefix: '{key_prefix}'}}\n"
        "logging: {configure: false}\nllm: {prompts_path: prompts.yml}\n"
    )
    container = Container(config_path=str(config))
    with pytest.raises(ConfigError, match="prompts"):
        await container.init_resources()
    # after a failed start only sync resources may be up: then there is nothing to await
    await maybe_await(container.shutdown_resources())
