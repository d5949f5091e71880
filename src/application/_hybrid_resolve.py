"""Where each item of a hybrid reply gets its audio: a cached fragment, a cached synthesis, a new
synthesis, or a missing fragment's transcript spoken instead.

Private to :mod:`voxcore.application.hybrid`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Final

from voxcore.application._hybrid_state import (
    MAX_REMEMBERED_KEYS,
    Feed,
    Slot,
    Synthesis,
    describe,
    remember_key,
)
from voxcore.application._hybrid_synthesis import SynthesisPool
from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.hybrid import ItemSource
from voxcore.core.domain.playlist import StaticItem, TTSItem
from voxcore.core.domain.tts_text import tts_cache_key
from voxcore.core.ports.cache import AbstractAudioCache
from voxcore.events import emit

logger = logging.getLogger("voxcore.hybrid")

# Remembered static formats (a few hundred fragments is a large manifest).
_MAX_REMEMBERED_FORMATS: Final = 4096


class FeedResolver:
    """Resolves playlist items to feeds (see :class:`~voxcore.application.hybrid.HybridResponder`).

    Args:
        cache: The audio cache.
        pool: The responder's syntheses.
        target_format: The format of the reply (and of syntheses).
        voice: TTS voice; model: TTS model; engine: the engine's name; speed: speaking rate;
            variant: how stored syntheses were processed (all four are part of ``tts:*`` keys).
        transcripts: ``static:*`` key -> transcript, for fragments missing from the cache.
        speculative_first_tts: Send the first item's TTS request together with its lookup.
        clock: Monotonic seconds.
    """

    def __init__(
        self,
        *,
        cache: AbstractAudioCache,
        pool: SynthesisPool,
        target_format: AudioFormat,
        voice: str,
        model: str,
        engine: str,
        speed: float,
        variant: str,
        transcripts: Mapping[str, str],
        speculative_first_tts: bool,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._cache = cache
        self._pool = pool
        self._target = target_format
        self._voice = voice
        self._model = model
        self._engine = engine
        self._speed = speed
        self._variant = variant
        self._transcripts = transcripts
        self._speculative = speculative_first_tts
        self._clock = clock
        # static key -> (first chunk, stored format) of the version seen last (see _resolve_static)
        self._formats: dict[str, tuple[bytes, AudioFormat]] = {}
        self._keys: dict[str, str] = {}  # text -> tts:* key (hashing costs more than a lookup here)

    async def resolve(self, slot: Slot, answered: Callable[[], None]) -> Feed:
        """The item's feed; ``answered`` is called early when a missing fragment falls back to TTS."""
        item = slot.item
        if isinstance(item, StaticItem):
            return await self._resolve_static(slot, item.key, answered)
        assert isinstance(item, TTSItem)
        return await self._resolve_tts(slot, item.text, kind="tts", source="miss")

    async def _resolve_static(self, slot: Slot, key: str, answered: Callable[[], None]) -> Feed:
        """Open the fragment and learn its stored format.

        The format comes from a second command. When the fragment was played before, its format is
        remembered together with its first chunk: if the first chunk is byte for byte the same, the
        remembered format is used at once and checked in the background before the second chunk
        (a fragment rewritten with the same first bytes in another format is switched over there,
        ``hybrid_format_changed``). Otherwise both commands go out together and both are awaited.
        """
        remembered = self._formats.get(key)
        fmt_task: asyncio.Future[AudioFormat | None] | None = None
        if remembered is None:
            fmt_task = asyncio.ensure_future(self._cache.get_audio_format(key))
        try:
            stream = await self._cache.open_audio_stream(key)
            if stream is None:
                return await self._static_missing(slot, key, answered)
            head = await anext(stream, None)
            answered_at = self._clock()
            if remembered is not None and head is not None and head == remembered[0]:
                check = asyncio.ensure_future(self._check_format(key, head))
                return Feed(
                    kind="static",
                    key=key,
                    source="hit",
                    fmt=remembered[1],
                    stream=stream,
                    head=head,
                    fmt_check=check,
                    answered_at=answered_at,
                )
            if fmt_task is None:  # the fragment changed since it was last played
                fmt_task = asyncio.ensure_future(self._cache.get_audio_format(key))
            stored = await fmt_task
        finally:
            if fmt_task is not None and not fmt_task.done():
                fmt_task.cancel()
        self._remember(key, head, stored)
        if stored is None:
            emit(logger, "hybrid_format_unknown", logging.WARNING, key=key, assumed=describe(self._target))
        return Feed(
            kind="static",
            key=key,
            source="hit",
            fmt=stored or self._target,
            stream=stream,
            head=head,
            answered_at=answered_at,
        )

    def tts_key(self, text: str) -> str:
        """``tts_cache_key`` of ``text`` for this voice/model/engine/format, remembered per text."""
        key = self._keys.get(text)
        if key is None:
            key = tts_cache_key(
                text,
                voice=self._voice,
                model=self._model,
                engine=self._engine,
                audio_format=self._target,
                speed=self._speed,
                variant=self._variant,
            )
            if len(self._keys) >= MAX_REMEMBERED_KEYS:
                del self._keys[next(iter(self._keys))]  # the oldest entry
            self._keys[text] = key
        return key

    async def _check_format(self, key: str, head: bytes) -> AudioFormat | None:
        stored = await self._cache.get_audio_format(key)
        self._remember(key, head, stored)
        return stored

    def _remember(self, key: str, head: bytes | None, stored: AudioFormat | None) -> None:
        if head is None or stored is None:
            self._formats.pop(key, None)
            return
        if key not in self._formats and len(self._formats) >= _MAX_REMEMBERED_FORMATS:
            del self._formats[next(iter(self._formats))]  # the oldest entry
        self._formats[key] = (head, stored)

    async def _static_missing(self, slot: Slot, key: str, answered: Callable[[], None]) -> Feed:
        self._formats.pop(key, None)
        transcript = self._transcripts.get(key)
        if transcript is None:
            emit(
                logger,
                "static_fragment_skipped",
                logging.ERROR,
                key=key,
                reason="missing from the cache and no transcript in the manifest",
            )
            return Feed(kind="static", key=key, source="skipped")
        emit(logger, "static_fragment_missing", logging.WARNING, key=key, fallback="tts")
        answered()  # the other items need not wait for the fallback's lookup
        return await self._resolve_tts(slot, transcript, kind="static", source="tts", shown_key=key)

    async def _resolve_tts(
        self,
        slot: Slot,
        text: str,
        *,
        kind: str,
        source: ItemSource,
        shown_key: str | None = None,
    ) -> Feed:
        try:
            key = self.tts_key(text)
        except DomainError as exc:
            emit(logger, "hybrid_item_unusable", logging.ERROR, key=shown_key or "", error=str(exc))
            return Feed(kind=kind, key=shown_key or "", source="skipped")
        shown = shown_key or key
        synthesis = self._pool.get(key)
        if synthesis is None:
            speculative: Synthesis | None = None
            if self._speculative and slot.index == 0 and key not in self._pool.present:
                # The first item's request goes out while its lookup runs (the lookup's command is
                # sent first, when it is awaited below), and is cancelled if the lookup finds the audio.
                speculative = self._pool.start(key, text, slot.span)
            stream = await self._cache.open_audio_stream(key)
            if stream is not None:
                remember_key(self._pool.present, key)
                if speculative is not None and speculative.consumers == 0:
                    emit(logger, "tts_speculation_cancelled", key=key)
                    self._pool.abandon(speculative)
                # The key covers the format (tts_cache_key): no need to ask for it.
                return Feed(
                    kind=kind,
                    key=shown,
                    source="hit" if source == "miss" else source,
                    fmt=self._target,
                    stream=stream,
                    answered_at=self._clock(),
                )
            self._pool.present.pop(key, None)  # expired, or never there
            synthesis = speculative or self._pool.get(key)  # another item may have started it
            if synthesis is None:
                synthesis = self._pool.start(key, text, slot.span)
        return Feed(kind=kind, key=shown, source=source, fmt=self._target, synthesis=synthesis)
