"""Hand-written fakes of the ports (tokenizer, LLM client, connection manager, cache) for unit tests.

They implement the port ABCs with plain in-memory behaviour and record what they were asked, so a
test can script a conversation and then check what went where. They are not mocks of Redis or
httpx: nothing here knows about wire protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncGenerator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional  # noqa: UP035 - AbstractCache's signatures are fixed by SPEC-A

from opentelemetry import trace
from pydantic import BaseModel

from voxcore.core.domain.audio import parse_wav, plan_chunks, split_pcm
from voxcore.core.domain.errors import InvalidAudioError
from voxcore.core.domain.models import ConversationMessage, LLMStreamChunk
from voxcore.core.ports.cache import AbstractCache
from voxcore.core.ports.llm import (
    AbstractLLMClient,
    GenerationResult,
    LLMConnectionManager,
    Prompt,
)
from voxcore.core.ports.tokenizer import Tokenizer
from voxcore.events import FIELDS_ATTR


class FakeTokenizer(Tokenizer):
    """One token per whitespace-separated word (plus the port's 4 per message); counts its calls."""

    name = "fake:words"
    exact = True

    def __init__(self) -> None:
        self.calls = 0

    def count(self, text: str) -> int:
        self.calls += 1
        return len(text.split())


@dataclass(frozen=True)
class FakeHTTPClient:
    """What :class:`FakeConnectionManager` hands out (stands in for an ``httpx.AsyncClient``)."""

    number: int


class FakeConnectionManager(LLMConnectionManager[FakeHTTPClient]):
    """Counts starts, client requests and shutdowns; can be told to fail ``get_client``."""

    def __init__(self, *, error: BaseException | None = None) -> None:
        self.error = error
        self.starts = 0
        self.get_client_calls = 0
        self.shutdowns = 0
        self._client: FakeHTTPClient | None = None

    async def start(self) -> None:
        self.starts += 1
        self._client = FakeHTTPClient(self.starts)

    async def get_client(self) -> FakeHTTPClient:
        self.get_client_calls += 1
        if self.error is not None:
            raise self.error
        if self._client is None:
            await self.start()
        assert self._client is not None
        return self._client

    async def shutdown(self) -> None:
        self.shutdowns += 1
        self._client = None

    @property
    def closed(self) -> bool:
        return self.shutdowns > 0 and self._client is None


@dataclass
class ScriptedReply:
    """One scripted answer of :class:`FakeLLMClient`.

    Attributes:
        chunks: What the stream yields, in order (see :func:`reply`).
        error: Raised after ``error_after`` chunks (``None``: the stream completes).
        error_after: How many chunks are yielded before ``error`` is raised.
        chunk_delay_s: Sleep before each chunk.
        pause_after: Wait on ``resume`` after yielding this many chunks (``None``: never).
        resume: The event a paused stream waits on.
        connection_reused: Reported in ``last_result``.
    """

    chunks: list[LLMStreamChunk]
    error: BaseException | None = None
    error_after: int = 0
    chunk_delay_s: float = 0.0
    pause_after: int | None = None
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    paused: asyncio.Event = field(default_factory=asyncio.Event)
    connection_reused: bool | None = True


def reply(
    text: str,
    *,
    is_safe: bool = True,
    aggression_score: int = 0,
    pieces: int = 3,
    metadata_text: bool = False,
    error: BaseException | None = None,
    error_after: int = 0,
    chunk_delay_s: float = 0.0,
    pause_after: int | None = None,
    connection_reused: bool | None = True,
) -> ScriptedReply:
    """A well-formed scripted answer: metadata chunk, text pieces, an empty final chunk.

    Args:
        text: The answer text, cut into ``pieces`` word groups.
        is_safe: Safety verdict carried by the first chunk.
        aggression_score: Aggression carried by the first chunk.
        pieces: How many text chunks.
        metadata_text: Put the first piece into the metadata chunk instead of sending it empty.
        error: See :class:`ScriptedReply` (also ``error_after``, ``chunk_delay_s``, ``pause_after``,
            ``connection_reused``).
    """
    words = text.split(" ")
    size = max(1, -(-len(words) // max(1, pieces)))
    parts = [" ".join(words[i : i + size]) for i in range(0, len(words), size)]
    for index in range(len(parts) - 1):
        parts[index] += " "
    first_text = parts.pop(0) if metadata_text and parts else ""
    chunks = [LLMStreamChunk(text_chunk=first_text, is_safe=is_safe, aggression_score=aggression_score)]
    chunks.extend(LLMStreamChunk(text_chunk=part) for part in parts)
    chunks.append(LLMStreamChunk(text_chunk="", is_final_chunk=True))
    return ScriptedReply(
        chunks=chunks,
        error=error,
        error_after=error_after,
        chunk_delay_s=chunk_delay_s,
        pause_after=pause_after,
        connection_reused=connection_reused,
    )


@dataclass(frozen=True)
class StreamCall:
    """One ``stream_structured_generate`` call."""

    http_client: FakeHTTPClient
    prompt: list[ConversationMessage]
    model: str
    response_model: type[BaseModel]


@dataclass(frozen=True)
class TextCall:
    """One ``generate_text`` call."""

    http_client: FakeHTTPClient
    prompt: list[ConversationMessage]
    model: str
    max_tokens: int | None


class FakeLLMClient(AbstractLLMClient[FakeHTTPClient]):
    """Scripted streams and summaries.

    Streams come from ``replies`` in order (then ``default_reply``); summaries from ``summaries``
    in order (a string is returned, an exception raised; then ``default_summary``). A summary call
    waits on ``summary_gate`` when one is set, so a test can hold a warm-up in flight.

    With a ``tracer``, every call opens a ``chat <model>`` span in the caller's current context,
    as the OpenAI adapter does, so tests can check how spans nest.
    """

    def __init__(
        self,
        *,
        replies: Iterable[ScriptedReply] = (),
        summaries: Iterable[str | BaseException] = (),
        default_reply: str = "Хорошо, сделаю.",
        default_summary: str = "Клиент спрашивал о полисе.",
        summary_gate: asyncio.Event | None = None,
        tracer: trace.Tracer | None = None,
    ) -> None:
        self.replies: deque[ScriptedReply] = deque(replies)
        self.summaries: deque[str | BaseException] = deque(summaries)
        self.default_reply = default_reply
        self.default_summary = default_summary
        self.summary_gate = summary_gate
        self.tracer = tracer
        self.calls: list[StreamCall] = []
        self.text_calls: list[TextCall] = []
        self.summary_started = asyncio.Event()
        self.completed_streams = 0
        self.closed_streams = 0  # streams the caller closed before they completed
        self._last_result: GenerationResult | None = None

    @property
    def last_result(self) -> GenerationResult | None:
        return self._last_result

    def stream_structured_generate(
        self,
        http_client: FakeHTTPClient,
        full_prompt: Prompt,
        model: str,
        response_model: type[BaseModel],
    ) -> AsyncGenerator[LLMStreamChunk, None]:
        prompt = _as_messages(full_prompt)
        self.calls.append(StreamCall(http_client, prompt, model, response_model))
        script = self.replies.popleft() if self.replies else reply(self.default_reply)
        return self._stream(script, model)

    async def _stream(self, script: ScriptedReply, model: str) -> AsyncGenerator[LLMStreamChunk, None]:
        span = self.tracer.start_span(f"chat {model}") if self.tracer is not None else None
        loop = asyncio.get_running_loop()
        started = loop.time()
        ttft: float | None = None
        sent = 0
        settled = False  # completed or raised its scripted error
        try:
            for chunk in script.chunks:
                if script.error is not None and sent == script.error_after:
                    settled = True
                    raise script.error
                if script.chunk_delay_s:
                    await asyncio.sleep(script.chunk_delay_s)
                if ttft is None:
                    ttft = (loop.time() - started) * 1000.0
                if chunk.is_final_chunk:
                    text = "".join(c.text_chunk for c in script.chunks)
                    self._last_result = GenerationResult(
                        response=_Answer(answer=text),
                        text=text,
                        usage=None,
                        ttft_ms=ttft,
                        total_ms=(loop.time() - started) * 1000.0,
                        chunks=len(script.chunks),
                        connection_reused=script.connection_reused,
                    )
                yield chunk
                sent += 1
                if script.pause_after is not None and sent == script.pause_after:
                    script.paused.set()
                    await script.resume.wait()
            settled = True
            if script.error is not None and sent == script.error_after:
                raise script.error
            self.completed_streams += 1
        finally:
            if not settled:
                self.closed_streams += 1
            if span is not None:
                span.end()

    async def generate_text(
        self, http_client: FakeHTTPClient, prompt: Prompt, model: str, *, max_tokens: int | None = None
    ) -> str:
        span = self.tracer.start_span(f"chat {model}") if self.tracer is not None else None
        try:
            self.text_calls.append(TextCall(http_client, _as_messages(prompt), model, max_tokens))
            self.summary_started.set()
            if self.summary_gate is not None:
                await self.summary_gate.wait()
            outcome = self.summaries.popleft() if self.summaries else self.default_summary
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome
        finally:
            if span is not None:
                span.end()


class _Answer(BaseModel):
    answer: str


def _as_messages(prompt: Prompt) -> list[ConversationMessage]:
    if isinstance(prompt, str):
        return [ConversationMessage(role="user", content=prompt)]
    return [ConversationMessage(role=m["role"], content=m["content"]) for m in prompt]


class FakeCache(AbstractCache):
    """``AbstractCache`` in memory: text with its TTL, audio chunk lists; soft like the real one.

    Set ``fail = True`` to make every call report a soft failure (``None``/``False``).
    """

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.ttls: dict[str, int] = {}
        self.audio: dict[str, list[bytes]] = {}
        self.fail = False
        self.connected = False
        self.get_text_calls: list[str] = []
        self.set_text_calls: list[tuple[str, str, int]] = []

    async def connect(self) -> None:
        self.connected = True

    async def close(self) -> None:
        self.connected = False

    async def load_and_set_audio(self, key: str, wav_filepath: str, chunk_size_ms: int = 20) -> bool:
        try:
            wav = parse_wav(await asyncio.to_thread(Path(wav_filepath).read_bytes))
            chunks = split_pcm(wav.pcm, plan_chunks(wav.format, chunk_size_ms))
        except (OSError, InvalidAudioError):
            return False
        return await self.set_audio_chunks(key, chunks)

    async def set_audio_chunks(self, key: str, audio_chunks: List[bytes]) -> bool:  # noqa: UP006
        if self.fail or not audio_chunks:
            return False
        self.audio[key] = list(audio_chunks)
        return True

    async def get_audio_chunks(self, key: str) -> Optional[List[bytes]]:  # noqa: UP006, UP045
        if self.fail:
            return None
        chunks = self.audio.get(key)
        return list(chunks) if chunks is not None else None

    async def set_text(self, key: str, text: str, ttl_seconds: int) -> bool:
        self.set_text_calls.append((key, text, ttl_seconds))
        if self.fail or ttl_seconds <= 0:
            return False
        self.texts[key] = text
        self.ttls[key] = ttl_seconds
        return True

    async def get_text(self, key: str) -> Optional[str]:  # noqa: UP045
        self.get_text_calls.append(key)
        if self.fail:
            return None
        return self.texts.get(key)


def texts(chunks: Sequence[LLMStreamChunk]) -> str:
    """The answer text of a list of chunks."""
    return "".join(chunk.text_chunk for chunk in chunks)


class EventLog(logging.Handler):
    """Collects the structured events voxcore's loggers emit."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def named(self, event: str) -> list[dict[str, Any]]:
        return [dict(getattr(r, FIELDS_ATTR, {})) for r in self.records if r.getMessage() == event]

    def names(self) -> list[str]:
        return [r.getMessage() for r in self.records]

    def clear(self) -> None:
        self.records.clear()


@contextlib.contextmanager
def captured_events(logger_name: str) -> Iterator[EventLog]:
    """An :class:`EventLog` on ``logger_name`` at DEBUG; the logger is restored afterwards."""
    handler = EventLog()
    logger = logging.getLogger(logger_name)
    previous = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)
