"""HybridResponder's per-item observer: one PlayedItem per item, after it played, failures contained."""

from __future__ import annotations

import logging

import pytest

from tests.unit.test_hybrid_responder import FakeAudioCache, FakeTTS, collect, fragment, key_of, make
from voxcore.core.domain.playlist import PauseItem, Playlist, StaticItem, TTSItem
from voxcore.core.ports.playback import PlayedItem
from voxcore.events import FIELDS_ATTR


async def test_every_item_is_reported_with_its_source_after_it_played() -> None:
    cache, tts = FakeAudioCache(), FakeTTS()
    cache.put("static:a", fragment(1, 60))
    responder = make(cache, tts, transcripts={"intro": "Ваша стоимость составляет"})
    seen: list[PlayedItem] = []
    chunks_when_reported: list[int] = []
    handed_out: list[bytes] = []

    def observer(item: PlayedItem) -> None:
        seen.append(item)
        chunks_when_reported.append(len(handed_out))

    playlist = Playlist.of(
        StaticItem("static:a"),
        TTSItem("слово"),
        PauseItem(20),
        StaticItem("static:intro"),
        StaticItem("static:x"),
    )
    async for chunk in responder.play(playlist, observer=observer):
        handed_out.append(chunk)

    assert [(i.index, i.kind, i.key, i.source) for i in seen] == [
        (0, "static", "static:a", "hit"),
        (1, "tts", key_of("слово", tts), "miss"),
        (2, "pause", None, "silence"),
        (3, "static", "static:intro", "tts"),  # missing: spoken from its transcript
        (4, "static", "static:x", "skipped"),  # missing, no transcript
    ]
    assert seen[0].chunks == 3 and seen[0].first_byte_ms is not None and seen[4].chunks == 0
    assert chunks_when_reported[0] >= 1  # reported after its audio, never before the first chunk
    assert sum(i.chunks for i in seen) >= len(handed_out) - 1
    await responder.shutdown()


async def test_text_replies_report_their_sentences_and_a_failing_observer_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache, tts = FakeAudioCache(), FakeTTS()
    responder = make(cache, tts)

    async def deltas():  # type: ignore[no-untyped-def]
        yield "Первая фраза. "
        yield "Вторая фраза."

    seen: list[PlayedItem] = []
    reference = await collect(responder.speak_text_stream(deltas(), observer=seen.append))
    assert [i.source for i in seen] == ["miss", "miss"] and all(i.kind == "tts" for i in seen)

    def broken(item: PlayedItem) -> None:
        raise RuntimeError("observer down")

    await responder.drain()
    with caplog.at_level(logging.WARNING, logger="voxcore.hybrid"):
        again = await collect(responder.speak_text_stream(deltas(), observer=broken))
    assert b"".join(again) == b"".join(reference)  # cached now, and played in full
    failures = [
        getattr(r, FIELDS_ATTR, {}) for r in caplog.records if r.getMessage() == "hybrid_item_observer_failed"
    ]
    assert len(failures) == 2 and "observer down" in failures[0]["error"]
    await responder.shutdown()
