"""Dialogue records, event ids, tokens (domain); the call emitter, recorder and consumer (with fakes)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest

from voxcore.application.dialogue import DialogueRecorder, restore_dialogue
from voxcore.application.live_events import CallEvents, Reset, follow_events
from voxcore.core.domain.dialogue import (
    ContextMark,
    CorruptDialogueError,
    DialogueSnapshot,
    StoredMessage,
    decode_mark,
    decode_message,
    decode_snapshot,
    encode_mark,
    encode_message,
)
from voxcore.core.domain.keys import (
    dialogue_messages_key,
    dialogue_summary_key,
    events_channel,
    events_stream_key,
)
from voxcore.core.domain.live_events import (
    InvalidEventIdError,
    LiveEvent,
    encode_data,
    event_from_fields,
    event_from_json,
    event_json,
    id_after,
    operator_token,
    parse_event_id,
    session_token,
    token_grants,
)
from voxcore.core.ports.dialogue import DialogueStore
from voxcore.core.ports.errors import BackendUnavailableError
from voxcore.core.ports.live_events import (
    LiveEventPublisher,
    LiveEventSource,
    LiveSubscription,
    PublisherStats,
    StreamGap,
)

# -- domain ------------------------------------------------------------------------------------------


def test_keys_share_one_hash_tag_per_session() -> None:
    keys = [
        dialogue_messages_key("c"),
        dialogue_summary_key("c"),
        events_stream_key("c"),
        events_channel("c"),
    ]
    tags = {key[key.index("{") : key.index("}") + 1] for key in keys}
    assert len(tags) == 1 and len(tags.pop()) == 18
    assert dialogue_messages_key("c") != dialogue_messages_key("d")


def test_messages_and_marks_round_trip_exactly() -> None:
    message = StoredMessage(
        seq=3,
        role="assistant",
        content='«кавычки» "и" \n переводы\u2028',
        ts=12.5,
        figures={"ttft": 1.5, "x": None},
    )
    assert decode_message(encode_message(message)) == message
    assert decode_message(encode_message(message).encode()) == message
    mark = ContextMark(summary="итог", first_seq=2, ts=3.0)
    assert decode_mark(encode_mark(mark)) == mark


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("{", "not valid JSON"),
        ("[]", "not a JSON object"),
        ('{"v": 2, "seq": 1, "role": "user", "content": "x", "ts": 1}', "format version 2"),
        ('{"seq": 1, "role": "user", "content": "x", "ts": 1}', "format version None"),
        ('{"v": 1, "seq": 0, "role": "user", "content": "x", "ts": 1}', "invalid seq"),
        ('{"v": 1, "seq": true, "role": "user", "content": "x", "ts": 1}', "invalid seq"),
        ('{"v": 1, "seq": 1, "role": "robot", "content": "x", "ts": 1}', "invalid role"),
        ('{"v": 1, "seq": 1, "role": "user", "content": 5, "ts": 1}', "non-text"),
        ('{"v": 1, "seq": 1, "role": "user", "content": "x", "ts": "now"}', "timestamp"),
        ('{"v": 1, "seq": 1, "role": "user", "content": "x", "ts": 1, "figures": [1]}', "figures"),
    ],
)
def test_corrupt_messages_are_refused(raw: str, match: str) -> None:
    with pytest.raises(CorruptDialogueError, match=match):
        decode_message(raw)


def test_snapshots_need_contiguous_messages_and_a_plausible_mark() -> None:
    m = [encode_message(StoredMessage(seq=n, role="user", content=str(n), ts=0.0)) for n in (4, 5, 6)]
    snapshot = decode_snapshot(m, encode_mark(ContextMark("s", 5)))
    assert isinstance(snapshot, DialogueSnapshot)
    assert [x.seq for x in snapshot.active_history()] == [5, 6] and snapshot.last_seq == 6
    assert decode_snapshot(m, encode_mark(ContextMark(None, 2))).missing_messages == 2  # type: ignore[union-attr]
    assert decode_snapshot([], None) is None
    with pytest.raises(CorruptDialogueError, match="not contiguous"):
        decode_snapshot([m[0], m[2]], None)
    with pytest.raises(CorruptDialogueError, match="after the last message"):
        decode_snapshot(m, encode_mark(ContextMark(None, 9)))


def test_event_ids_parse_and_order() -> None:
    assert parse_event_id("1700000000000-3") == (1700000000000, 3)
    assert id_after("2-0", "1-99") and id_after("1-10", "1-9") and not id_after("1-1", "1-1")
    for bad in (
        "",
        "1",
        "1-",
        "-1",
        "01-1",
        "1-1-1",
        "a-1",
        "1 -1",
        "9" * 21 + "-0",
        "18446744073709551616-0",
    ):
        with pytest.raises(InvalidEventIdError):
            parse_event_id(bad)


def test_event_wire_json_is_built_once_and_parses_back() -> None:
    data = encode_data({"text": "привет", "ms": 1.5, "nan": float("nan")})
    assert json.loads(data) == {"text": "привет", "ms": 1.5, "nan": None}
    raw = event_json("5-1", "user_text", 7, data)
    event = event_from_json(raw)
    assert event == LiveEvent("5-1", "user_text", 7, json.loads(data), raw)
    assert event_from_fields("5-1", "user_text", 7, data) == event
    with pytest.raises(ValueError):
        event_from_fields("5-1", "no_such_type", 7, data)
    with pytest.raises(ValueError):
        event_from_json('{"id": "x", "type": "user_text", "ts": 1, "data": {}}')


def test_tokens_are_per_session_and_domain_separated() -> None:
    a, b = session_token("s3cret", "A"), session_token("s3cret", "B")
    op = operator_token("s3cret")
    assert len({a, b, op}) == 3 and len(a) == 64
    assert session_token("other", "A") != a
    assert token_grants("s3cret", a, "A") and not token_grants("s3cret", a, "B")
    assert token_grants("s3cret", op, "B") and token_grants("s3cret", op, None)
    assert not token_grants("s3cret", a, None)  # the index is for operators
    for bad in (None, "", "токен", op[:-1], a.upper()):
        assert not token_grants("s3cret", bad, "A")
    assert not token_grants("", a, "A")


# -- the call emitter -----------------------------------------------------------------------------


class RecordingPublisher(LiveEventPublisher):
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def publish(self, session_id: str, event_type: str, data: Mapping[str, Any]) -> bool:
        self.events.append((session_id, event_type, dict(data)))
        return True

    @property
    def stats(self) -> PublisherStats:
        return PublisherStats(len(self.events), 0, 0, 0)

    async def flush(self, within_s: float | None = None) -> bool:
        return True

    async def aclose(self) -> None:
        return None


async def test_answer_deltas_are_coalesced_and_flushed_at_turn_end() -> None:
    publisher = RecordingPublisher()
    now = [0.0]
    events = CallEvents(publisher=publisher, session_id="c", coalesce_ms=30, clock=lambda: now[0])
    events.call_started(model="m")
    events.turn_started(1, "вопрос")
    now[0] = 0.25
    for piece in ("Здрав", "ствуйте", "!"):
        events.answer_delta(piece)
    await asyncio.sleep(0.06)  # the coalescing timer fires once
    events.answer_delta(" Чем")
    events.answer_delta(" помочь?")
    events.turn_finished({"turn": 1, "time_to_first_token_ms": 200.0, "outcome": "ok"})
    events.call_ended(turns=1)
    events.call_ended(turns=1)  # once
    kinds = [(t, d.get("text")) for _, t, d in publisher.events]
    assert kinds == [
        ("call_started", None),
        ("user_text", "вопрос"),
        ("answer_text", "Здравствуйте!"),
        ("answer_text", " Чем помочь?"),
        ("turn", None),
        ("call_ended", None),
    ]
    turn = publisher.events[4][2]
    assert turn["time_to_first_text_ms"] == pytest.approx(250.0) and turn["time_to_first_token_ms"] == 200.0


# -- the recorder ---------------------------------------------------------------------------------


class FlakyStore(DialogueStore):
    def __init__(self) -> None:
        self.down = False
        self.writes: list[tuple[list[StoredMessage], ContextMark, bool]] = []

    async def append(
        self, session_id: str, messages: Sequence[StoredMessage], mark: ContextMark, *, replace: bool = False
    ) -> None:
        await asyncio.sleep(0)
        if self.down:
            raise BackendUnavailableError("down")
        self.writes.append((list(messages), mark, replace))

    async def load(self, session_id: str) -> DialogueSnapshot | None:
        if self.down:
            raise BackendUnavailableError("down")
        raise CorruptDialogueError("broken")

    async def delete(self, session_id: str) -> None:
        return None


def turn(n: int) -> tuple[Any, Any]:
    return ({"role": "user", "content": f"q{n}"}, {"role": "assistant", "content": f"a{n}"})


async def test_recorder_writes_in_the_background_numbers_and_marks() -> None:
    store = FlakyStore()
    recorder = DialogueRecorder(
        store=store, session_id="c", first_seq=5, replace=False, wall_clock=lambda: 9.0
    )
    recorder.record(turn(1), history_length=3, summary="s", figures={"turn": 1})
    assert store.writes == []  # nothing awaited on the caller's path
    assert await recorder.flush(1)
    (messages, mark, replace) = store.writes[0]
    assert (
        [m.seq for m in messages] == [5, 6] and messages[1].figures == {"turn": 1} and not messages[0].figures
    )
    assert mark == ContextMark("s", 4, 9.0) and replace is False  # 3 messages: seq 4..6
    await recorder.aclose()


async def test_recorder_bounded_while_the_store_is_down_then_rewrites_the_kept_suffix() -> None:
    store = FlakyStore()
    store.down = True
    recorder = DialogueRecorder(
        store=store, session_id="c", max_pending=4, replace=False, retry_delays_s=(0.01,)
    )
    for n in range(5):
        recorder.record(turn(n), history_length=2 * n + 2, summary=None)
    assert recorder.pending == 4
    await asyncio.sleep(0.05)
    store.down = False
    assert await recorder.flush(2)
    messages, mark, replace = store.writes[-1]
    assert [m.seq for m in messages] == [7, 8, 9, 10] and replace is True  # no hole in the stored run
    assert recorder.failures >= 1
    await recorder.aclose()


async def test_recorder_close_gives_up_after_the_drain_timeout(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore()
    store.down = True
    recorder = DialogueRecorder(store=store, session_id="c", drain_timeout_s=0.05, retry_delays_s=(0.01,))
    recorder.record(turn(1), history_length=2, summary=None)
    await recorder.aclose()
    assert any(r.message == "dialogue_write_lost" for r in caplog.records)


async def test_restore_refuses_corrupt_and_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore()
    assert await restore_dialogue(store, "c") is None
    store.down = True
    assert await restore_dialogue(store, "c") is None
    reasons = [r.voxcore_fields["reason"] for r in caplog.records if r.message == "dialogue_restore_refused"]  # type: ignore[attr-defined]
    assert reasons == ["corrupt", "unavailable"]


# -- the consumer -----------------------------------------------------------------------------------


def ev(n: int) -> LiveEvent:
    return event_from_json(event_json(f"{n}-0", "user_text", n, f'{{"n": {n}}}'))


class FakeSource(LiveEventSource):
    """Stored events and a scripted live feed: the canonical consumer's contract, no Redis."""

    def __init__(
        self, stored: list[LiveEvent], live: list[LiveEvent | StreamGap], trimmed: str | None = None
    ) -> None:
        self.stored = stored
        self.live = live
        self.trimmed = trimmed
        self.during_gap: list[LiveEvent] = []
        self.subscribed_before_read = False
        self._subscribed = False

    @asynccontextmanager
    async def subscribe(self, session_id: str | None, *, queue_size: int) -> AsyncIterator[LiveSubscription]:
        self._subscribed = True
        source = self

        class Sub(LiveSubscription):
            async def __aiter__(self) -> AsyncIterator[LiveEvent | StreamGap]:  # type: ignore[override]
                while source.live:
                    item = source.live.pop(0)
                    if isinstance(item, LiveEvent):
                        source.stored.append(item)
                    else:  # stored while the live feed was down
                        source.stored.extend(source.during_gap)
                    yield item

        yield Sub()

    async def read_after(
        self, session_id: str | None, after_id: str | None, count: int
    ) -> Sequence[LiveEvent]:
        self.subscribed_before_read = self._subscribed
        after = parse_event_id(after_id) if after_id else (-1, 0)
        return [e for e in self.stored if e.key > after][:count]

    async def trimmed_after(self, session_id: str | None, after_id: str) -> str | None:
        return self.trimmed


async def collect(source: FakeSource, last_id: str | None = None) -> list[Any]:
    return [item async for item in follow_events(source, "c", last_id=last_id)]


async def test_consumer_replays_then_follows_live_without_duplicates() -> None:
    stored = [ev(n) for n in range(1, 6)]
    # The live feed repeats what the replay already returned (published between SUBSCRIBE and XRANGE).
    source = FakeSource(stored, [ev(4), ev(5), ev(6), ev(7)])
    got = await collect(source, last_id="2-0")
    assert [e.id for e in got] == ["3-0", "4-0", "5-0", "6-0", "7-0"]
    assert source.subscribed_before_read


async def test_consumer_replays_again_after_a_live_gap() -> None:
    source = FakeSource([ev(1)], [ev(2), StreamGap(), ev(5)])
    source.during_gap = [ev(3), ev(4)]
    got = await collect(source)
    assert [e.id for e in got] == ["1-0", "2-0", "3-0", "4-0", "5-0"]


async def test_consumer_resets_when_the_position_is_gone() -> None:
    source = FakeSource([ev(7), ev(8)], [], trimmed="7-0")
    got = await collect(source, last_id="3-0")
    assert got[0] == Reset("7-0")
    assert [e.id for e in got[1:]] == ["7-0", "8-0"]
    with pytest.raises(InvalidEventIdError):
        await collect(source, last_id="bogus")
