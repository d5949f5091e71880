"""The offline demo's simulated call: LLM turns and hybrid replies rendered to a WAV file + reports.

The caller's lines are scripted; the bot answers through the whole stack: the conversation manager
(LLM simulator unless a provider is configured), and the hybrid responder, which plays recorded
fragments from Redis (the shipped recordings: demo phrases and the number fragment pack, so amounts
are spoken from word fragments) and synthesizes free text with espeak-ng (or the configured
provider's TTS). It never speaks with the simulator's test tones. The call is played twice: on the
second pass every synthesized part comes from the TTS cache, which the report shows.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import shutil
import sys
import time
import wave
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from voxcore.application.hybrid import HybridResponder
from voxcore.application.manager import ConversationManager
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.fragments import FragmentSpec
from voxcore.core.domain.playlist import silence
from voxcore.core.domain.russian import hybrid_amount_playlist, money_words
from voxcore.core.ports.errors import ConfigurationError, TTSError
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.entrypoints.runtime import Runtime
from voxcore.events import emit

log = logging.getLogger("voxcore.demo")
T = TypeVar("T")

#: Telephone-band audio (what a phone bot sends to a SIP/RTP gateway).
CALL_FORMAT = AudioFormat(16_000, 1, 2)
PAUSE_BETWEEN_TURNS_MS = 400
#: The provider TTS start-up check gives up after this long.
SPEECH_CHECK_TIMEOUT_S = 15.0


@dataclass(frozen=True, slots=True)
class CallStep:
    """One exchange: what the caller says, and how the bot answers."""

    caller: str
    amount: int | None = None  # a price reply: intro + the amount from the number fragment pack


SCRIPT = (
    CallStep("Здравствуйте! Я хочу застраховать квартиру."),
    CallStep("Сколько это будет стоить в год?", amount=12_500),
    CallStep("А если оплатить сразу за два года?", amount=21_001),
    CallStep("Понятно, спасибо. До свидания!"),
)


@dataclass
class StepRecord:
    """What one bot reply cost and where its audio came from."""

    pass_no: int
    step: int
    caller: str
    reply_text: str
    kind: str
    time_to_first_token_ms: float | None
    time_to_first_text_ms: float | None  # the user's turn start -> first speakable answer character
    time_to_first_audio_ms: float | None  # the user's turn start -> first audio chunk (LLM included)
    playlist_first_audio_ms: float | None  # the reply's own start -> first audio chunk
    audio_ms: float
    hits: int
    misses: int
    tts_ttfb_ms: float | None
    outcome: str = "ok"
    voices: list[str] = field(default_factory=list)  # who spoke: "static", "espeak-ng/ru"...
    degraded_items: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


async def resolved(value: T | Awaitable[T]) -> T:
    """An async ``Resource`` provider hands out an awaitable (typed as the value itself)."""
    if inspect.isawaitable(value):
        return await value
    return value


async def speech_check(engine: TTSEngine, voice: str, model: str) -> str | None:
    """The start-up check of a provider's TTS: its settings, then one short real synthesis.

    Returns:
        ``None`` when the engine speaks; else why not (e.g. the provider has no ``/audio/speech``:
        404, or refuses the key: 401).
    """
    try:
        await engine.check()
        request = SpeechRequest(text="Проверка связи.", voice=voice, model=model)
        async with asyncio.timeout(SPEECH_CHECK_TIMEOUT_S):
            async for _ in engine.stream_speech(request):
                pass
    except (TTSError, ConfigurationError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return None


def check_voice(runtime: Runtime) -> None:
    """Fail before the demo starts when it would have no real voice (see :func:`choose_engine`).

    Raises:
        ConfigurationError: neither espeak-ng nor a configured provider.
    """
    if shutil.which(runtime.settings.voice.espeak.binary) is None and runtime.on_simulator:
        raise ConfigurationError(
            f"the demo speaks with espeak-ng, which is not installed "
            f"({runtime.settings.voice.espeak.binary!r} not on PATH): run `make demo` (it installs it) "
            "or `apt-get install espeak-ng`"
        )


async def choose_engine(runtime: Runtime, engines: dict[str, TTSEngine]) -> tuple[str, TTSEngine, str]:
    """The configured voice's engine when a real provider speaks, else espeak-ng (real Russian speech).

    The voice is ``voice.hybrid.agent``'s (default: ``voice.default_agent``). A provider's TTS must pass
    :func:`speech_check` first; when it fails (no ``/audio/speech``, a refused key), the demo says so
    (event ``demo_tts_fallback`` and a line on stderr) and speaks with the local espeak-ng engine.

    Raises:
        ConfigurationError: no engine can speak: espeak-ng is not installed and no provider's TTS
            works (the simulator's test tones are never passed off as speech).
    """
    settings = runtime.settings.voice
    agent = settings.agents.get(settings.hybrid.agent or "") or settings.default_agent
    binary = settings.espeak.binary
    has_espeak = shutil.which(binary) is not None
    wants_provider = agent is not None and agent.engine == "openai"
    failure: str | None = None
    if not runtime.on_simulator and (wants_provider or not has_espeak):
        voice = agent.voice if agent is not None and agent.engine == "openai" else "alloy"
        model = agent.model if agent is not None and agent.model else settings.openai.model
        failure = await speech_check(engines["openai"], voice, model)
        if failure is None:
            return "openai", engines["openai"], voice
        emit(
            log,
            "demo_tts_fallback",
            logging.WARNING,
            engine="openai",
            reason=failure,
            fallback="espeak-ng" if has_espeak else None,
        )
        if has_espeak:
            sys.stderr.write(
                f"the configured TTS engine (openai at {settings.openai.base_url or runtime.llm_target}) "
                f"failed its start-up check ({failure}): the demo speaks with the local espeak-ng engine\n"
            )
    if has_espeak:
        return "espeak-ng", engines["espeak-ng"], "ru"
    raise ConfigurationError(
        f"the demo speaks with espeak-ng, which is not installed ({binary!r} not on PATH): "
        "run `make demo` (it installs it) or `apt-get install espeak-ng`"
        + (f"; the provider's TTS failed its start-up check too ({failure})" if failure else "")
    )


def write_wav(path: Path, pcm: bytes, fmt: AudioFormat) -> None:
    """Write PCM as a WAV file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(fmt.channels)
        out.setsampwidth(fmt.sample_width)
        out.setframerate(fmt.sample_rate)
        out.writeframes(pcm)


async def _llm_text(manager: ConversationManager, text: str) -> AsyncIterator[str]:
    async for chunk in manager.process_user_turn(text):
        if chunk.text_chunk:
            yield chunk.text_chunk


async def simulated_call(
    runtime: Runtime, *, report_dir: Path, specs: list[FragmentSpec], passes: int = 2
) -> dict[str, Any]:
    """Run the scripted call ``passes`` times; write ``demo_call_*.wav`` + ``.md`` + ``.json``."""
    container = runtime.container
    engines = await resolved(container.tts_engines())
    engine_name, engine, voice = await choose_engine(runtime, engines)
    cache = container.cache()
    fragments = "shipped recordings (espeak-ng/ru, scripts/make_speech_fragments.py)"
    emit(log, "demo_call_start", tts_engine=engine_name, voice=voice, fragments=fragments)
    responder = HybridResponder(
        cache=cache,
        tts=engine,
        converter=container.audio_converter(),
        target_format=CALL_FORMAT,
        voice=voice,
        transcripts={spec.key: spec.transcript for spec in specs},
        join_pause_ms=runtime.settings.voice.hybrid.join_pause_ms,
    )
    records: list[StepRecord] = []
    audio = bytearray()
    gap = silence(CALL_FORMAT, PAUSE_BETWEEN_TURNS_MS)
    try:
        for pass_no in range(1, passes + 1):
            manager = await container.open_conversation(f"demo-call-pass-{pass_no}")
            try:
                for step_no, step in enumerate(SCRIPT, 1):
                    records.append(await _play_step(manager, responder, step, pass_no, step_no, audio))
                    audio += gap
            finally:
                await manager.shutdown()
            await responder.drain()  # the second pass must find what the first one synthesized
    finally:
        await responder.shutdown()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    wav_path = report_dir / f"demo_call_{stamp}.wav"
    write_wav(wav_path, bytes(audio), CALL_FORMAT)
    emit(log, "report_saved", path=str(wav_path))
    report = {
        "generated_at": datetime.now(UTC).isoformat(),
        "llm": "simulator" if runtime.on_simulator else runtime.llm_target,
        "tts_engine": engine_name,
        "voice": voice,
        "fragments": fragments,
        "audio_format": {"sample_rate": CALL_FORMAT.sample_rate, "channels": 1, "sample_width": 2},
        "wav": str(wav_path),
        "duration_s": round(CALL_FORMAT.duration_ms(len(audio)) / 1000, 2),
        "steps": [r.__dict__ for r in records],
    }
    json_path = report_dir / f"demo_call_{stamp}.json"
    json_path.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    emit(log, "report_saved", path=str(json_path))
    md_path = report_dir / f"demo_call_{stamp}.md"
    md_path.write_text(_markdown(report), encoding="utf-8")
    emit(log, "report_saved", path=str(md_path))
    emit(log, "demo_call_done", wav=str(wav_path), report=str(md_path), duration_s=report["duration_s"])
    return report


async def _play_step(
    manager: ConversationManager,
    responder: HybridResponder,
    step: CallStep,
    pass_no: int,
    step_no: int,
    audio: bytearray,
) -> StepRecord:
    started = time.perf_counter()  # the user's turn starts: time_to_first_audio_ms counts from here
    before = len(audio)
    if step.amount is None:
        stream = responder.speak_text_stream(_llm_text(manager, step.caller), turn_started_at=started)
        kind = "llm + tts"
    else:
        # A price reply is built from fragments, not generated: the LLM still hears the turn.
        async for _ in _llm_text(manager, step.caller):
            pass
        stream = responder.play(hybrid_amount_playlist(step.amount), turn_started_at=started)
        kind = f"hybrid: intro + say_money({step.amount})"
    async for chunk in stream:
        audio += chunk
    metrics = responder.last_metrics
    llm = manager.last_turn_metrics
    _publish_reply(manager, metrics)
    history = manager.active_context.get_history_for_summary()
    reply = " ".join(history[-1]["content"].split()) if history else ""
    record = StepRecord(
        pass_no=pass_no,
        step=step_no,
        caller=step.caller,
        reply_text=reply if step.amount is None else f"{hybrid_text(step.amount)}",
        kind=kind,
        time_to_first_token_ms=llm.time_to_first_token_ms if llm else None,
        time_to_first_text_ms=llm.time_to_first_text_ms if llm else None,
        time_to_first_audio_ms=metrics.time_to_first_audio_ms if metrics else None,
        playlist_first_audio_ms=metrics.playlist_first_audio_ms if metrics else None,
        audio_ms=round(CALL_FORMAT.duration_ms(len(audio) - before), 1),
        hits=metrics.hits if metrics else 0,
        misses=metrics.misses if metrics else 0,
        tts_ttfb_ms=metrics.tts_ttfb_ms if metrics else None,
        outcome=metrics.outcome if metrics else "failed",
        voices=list(metrics.voices) if metrics else [],
        degraded_items=list(metrics.degraded_items) if metrics else [],
        extra={"wall_ms": round((time.perf_counter() - started) * 1000, 1)},
    )
    emit(log, "demo_call_step", **{k: v for k, v in record.__dict__.items() if k != "extra"})
    return record


def _publish_reply(manager: ConversationManager, metrics: Any) -> None:
    """The reply's audio figures and items as live events of the call (the dashboard shows them)."""
    events = manager.events
    if events is None or metrics is None:
        return
    if metrics.time_to_first_audio_ms is not None:
        events.audio_started(
            metrics.time_to_first_audio_ms, playlist_first_audio_ms=metrics.playlist_first_audio_ms
        )
    if metrics.hits:
        events.hybrid_item(kind="hit", count=metrics.hits)
    if metrics.misses:
        events.hybrid_item(kind="tts", count=metrics.misses, tts_ttfb_ms=metrics.tts_ttfb_ms)
    for item in metrics.degraded_items:
        events.hybrid_item(kind="miss", item=item)


def hybrid_text(amount: int) -> str:
    """What a price reply says, as text (for the report)."""
    return f"Ваша стоимость составляет {money_words(amount)}"


def _markdown(report: dict[str, Any]) -> str:
    llm = (
        "**local simulator** (no OPENAI_API_KEY/OPENAI_BASE_URL: scripted answers, not a real model)"
        if report["llm"] == "simulator"
        else report["llm"]
    )
    lines = [
        f"# Simulated call — {report['generated_at']}",
        "",
        f"- call audio: `{report['wav']}` ({report['duration_s']} s, 16 kHz mono 16-bit)",
        f"- LLM: {llm}; TTS: `{report['tts_engine']}` (voice `{report['voice']}`); "
        f"fragments: {report['fragments']}",
        "",
        "`time_to_first_audio_ms`: the user's turn start -> first audio chunk of the reply (the LLM "
        "included); `playlist_first_audio_ms`: the reply's own start -> first chunk; "
        "`time_to_first_token_ms`: the LLM request -> first streamed token; `time_to_first_text_ms`: the "
        "turn start -> first speakable answer character.",
        "",
        "| pass | step | caller | reply | kind | spoken by | outcome | time_to_first_token_ms "
        "| time_to_first_text_ms | time_to_first_audio_ms | playlist_first_audio_ms | TTS TTFB ms "
        "| cache hits | TTS misses |",
        "|---:|---:|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in report["steps"]:
        outcome = s["outcome"] + (f" ({'; '.join(s['degraded_items'])})" if s["degraded_items"] else "")
        lines.append(
            f"| {s['pass_no']} | {s['step']} | {s['caller']} | {s['reply_text']} | {s['kind']} | "
            f"{', '.join(f'`{v}`' for v in s['voices']) or '-'} | {outcome} | "
            f"{_num(s['time_to_first_token_ms'])} | {_num(s['time_to_first_text_ms'])} | "
            f"{_num(s['time_to_first_audio_ms'])} | "
            f"{_num(s['playlist_first_audio_ms'])} | {_num(s['tts_ttfb_ms'])} | {s['hits']} | {s['misses']} |"
        )
    second = [s for s in report["steps"] if s["pass_no"] == 2]
    if second:
        misses = sum(s["misses"] for s in second)
        verdict = "every synthesized part came from the TTS cache" if misses == 0 else f"{misses} TTS misses"
        lines += ["", f"Second pass: {verdict}.", ""]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
