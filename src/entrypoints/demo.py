"""The offline demo's simulated call: LLM turns and hybrid replies rendered to a WAV file + reports.

The caller's lines are scripted; the bot answers through the whole stack: the conversation manager
(LLM simulator unless a provider is configured), and the hybrid responder, which plays recorded
fragments from Redis and synthesizes the dynamic parts (espeak-ng when installed, else the
simulator's ``/v1/audio/speech``). The call is played twice: on the second pass every synthesized
part comes from the TTS cache, which the report shows.
"""

from __future__ import annotations

import inspect
import json
import logging
import shutil
import tempfile
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
from voxcore.core.domain.russian import format_amount, hybrid_amount_playlist, plural_form
from voxcore.core.ports.tts import SpeechRequest, TTSEngine
from voxcore.entrypoints.runtime import Runtime
from voxcore.events import emit

log = logging.getLogger("voxcore.demo")
T = TypeVar("T")

#: Telephone-band audio (what a phone bot sends to a SIP/RTP gateway).
CALL_FORMAT = AudioFormat(16_000, 1, 2)
PAUSE_BETWEEN_TURNS_MS = 400


@dataclass(frozen=True, slots=True)
class CallStep:
    """One exchange: what the caller says, and how the bot answers."""

    caller: str
    amount: int | None = None  # a price reply: intro + TTS(amount) + the inflected currency


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
    llm_ttft_ms: float | None
    first_audio_ms: float | None
    audio_ms: float
    hits: int
    misses: int
    tts_ttfb_ms: float | None
    extra: dict[str, Any] = field(default_factory=dict)


async def resolved(value: T | Awaitable[T]) -> T:
    """An async ``Resource`` provider hands out an awaitable (typed as the value itself)."""
    if inspect.isawaitable(value):
        return await value
    return value


def choose_engine(runtime: Runtime, engines: dict[str, TTSEngine]) -> tuple[str, TTSEngine, str]:
    """espeak-ng when its binary is installed (real Russian speech), else the OpenAI-compatible engine."""
    binary = runtime.settings.voice.espeak.binary
    if shutil.which(binary):
        return "espeak-ng", engines["espeak-ng"], "ru"
    return "openai", engines["openai"], "alloy"


async def speak_fragments(
    specs: list[FragmentSpec], engine: TTSEngine, voice: str, out_dir: Path
) -> list[tuple[str, Path]]:
    """Record each fragment's transcript with the engine into a WAV file (real speech for the demo)."""
    made: list[tuple[str, Path]] = []
    for spec in specs:
        if not spec.transcript:
            continue
        pcm = bytearray()
        async for piece in engine.stream_speech(
            SpeechRequest(spec.transcript, voice, audio_format=CALL_FORMAT)
        ):
            pcm += piece
        path = out_dir / f"{spec.key.removeprefix('static:')}.wav"
        write_wav(path, bytes(pcm), CALL_FORMAT)
        made.append((spec.key, path))
    return made


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
    engine_name, engine, voice = choose_engine(runtime, engines)
    cache = container.cache()
    if engine_name == "espeak-ng":
        with tempfile.TemporaryDirectory(prefix="voxcore-demo-") as tmp:
            for key, path in await speak_fragments(specs, engine, voice, Path(tmp)):
                await cache.load_audio_file(key, str(path))
        fragments = "recorded with espeak-ng for this run"
    else:
        fragments = "shipped speech-like placeholders"
    emit(log, "demo_call_start", tts_engine=engine_name, voice=voice, fragments=fragments)
    responder = HybridResponder(
        cache=cache,
        tts=engine,
        converter=container.audio_converter(),
        target_format=CALL_FORMAT,
        voice=voice,
        transcripts={spec.key: spec.transcript for spec in specs},
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
    started = time.perf_counter()
    before = len(audio)
    if step.amount is None:
        stream = responder.speak_text_stream(_llm_text(manager, step.caller))
        kind = "llm + tts"
    else:
        # A price reply is built from fragments, not generated: the LLM still hears the turn.
        async for _ in _llm_text(manager, step.caller):
            pass
        stream = responder.play(hybrid_amount_playlist(step.amount))
        kind = f"hybrid: intro + tts({step.amount}) + currency"
    async for chunk in stream:
        audio += chunk
    metrics = responder.last_metrics
    llm = manager.last_turn_metrics
    history = manager.active_context.get_history_for_summary()
    reply = " ".join(history[-1]["content"].split()) if history else ""
    record = StepRecord(
        pass_no=pass_no,
        step=step_no,
        caller=step.caller,
        reply_text=reply if step.amount is None else f"{hybrid_text(step.amount)}",
        kind=kind,
        llm_ttft_ms=llm.time_to_first_token_ms if llm else None,
        first_audio_ms=metrics.first_audio_ms if metrics else None,
        audio_ms=round(CALL_FORMAT.duration_ms(len(audio) - before), 1),
        hits=metrics.hits if metrics else 0,
        misses=metrics.misses if metrics else 0,
        tts_ttfb_ms=metrics.tts_ttfb_ms if metrics else None,
        extra={"wall_ms": round((time.perf_counter() - started) * 1000, 1)},
    )
    emit(log, "demo_call_step", **{k: v for k, v in record.__dict__.items() if k != "extra"})
    return record


def hybrid_text(amount: int) -> str:
    """What a price reply says, as text (for the report)."""
    return (
        f"Ваша стоимость составляет {format_amount(amount)} {plural_form(amount, 'рубль', 'рубля', 'рублей')}"
    )


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
        "| pass | step | caller | reply | kind | LLM TTFT ms | first audio ms | TTS TTFB ms | cache hits "
        "| TTS misses |",
        "|---:|---:|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for s in report["steps"]:
        lines.append(
            f"| {s['pass_no']} | {s['step']} | {s['caller']} | {s['reply_text']} | {s['kind']} | "
            f"{_num(s['llm_ttft_ms'])} | {_num(s['first_audio_ms'])} | {_num(s['tts_ttfb_ms'])} | "
            f"{s['hits']} | {s['misses']} |"
        )
    second = [s for s in report["steps"] if s["pass_no"] == 2]
    if second:
        misses = sum(s["misses"] for s in second)
        verdict = "every synthesized part came from the TTS cache" if misses == 0 else f"{misses} TTS misses"
        lines += ["", f"Second pass: {verdict}.", ""]
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
