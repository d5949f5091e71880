"""Hybrid replies from the LLM: segments of recorded fragments and dynamic text, playlists, turn metrics."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.keys import STATIC_PREFIX
from voxcore.core.domain.models import LLMStructuredResponse
from voxcore.core.domain.playlist import Playlist, PlaylistError, PlaylistItem, StaticItem, TTSItem
from voxcore.core.domain.sentences import SentenceSplitter

#: Prefix of the span attributes that mirror :class:`HybridTurnMetrics` (``voxcore.hybrid.items``...).
TURN_ATTRIBUTE_PREFIX = "voxcore.hybrid."


def _drop_description(schema: dict[str, Any]) -> None:
    # Class docstrings are for developers; the LLM reads the field descriptions only.
    schema.pop("description", None)


class StaticSegment(BaseModel):
    """A recorded fragment, named as in the fragment manifest (``intro`` or ``static:intro``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_drop_description)

    static: str = Field(description="Name of a recorded fragment to play, exactly as listed.")


class TTSSegment(BaseModel):
    """Dynamic text (a number, a date, a name) to synthesize, possibly from the TTS cache."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_drop_description)

    tts: str = Field(description="Short dynamic text to synthesize, e.g. an amount written in digits.")


Segment: TypeAlias = StaticSegment | TTSSegment


class HybridStructuredResponse(LLMStructuredResponse):
    """:class:`LLMStructuredResponse` whose reply may also be a sequence of segments.

    Field order (it is the order a streaming model writes them, and the order they are spoken): the
    safety metadata, then ``answer`` (free text, may be empty), then ``segments``. A reply like
    "Ваша стоимость составляет 12 500 рублей" is best given as segments
    ``[{"static": "intro"}, {"tts": "12 500"}, {"static": "currency_rub_many"}]``: the recorded
    parts play from the cache at once and only "12 500" is synthesized.

    The JSON schema (:func:`~voxcore.core.domain.models.json_schema_for`) is valid in strict mode:
    each segment is an object with exactly one required property, ``static`` or ``tts``.

    Attributes:
        segments: The structured part of the reply, spoken after ``answer``.
    """

    answer: str = Field(
        default="",
        description="Free reply text to speak first; empty when the segments say everything.",
    )
    segments: list[Segment] = Field(
        default_factory=list,
        description=(
            "Reply parts spoken after the answer, in order: {'static': <fragment name>} plays a "
            "recorded fragment, {'tts': <text>} synthesizes dynamic text. Empty when not needed."
        ),
    )


@dataclass(frozen=True, slots=True)
class RejectedSegment:
    """A segment that was left out of a playlist.

    Attributes:
        index: Position in ``segments``.
        segment: The segment as given (``static:<name>`` or ``tts:<text>``).
        reason: Why it was left out.
    """

    index: int
    segment: str
    reason: str


@dataclass(frozen=True, slots=True)
class HybridPlaylist:
    """What a structured answer says, as a playlist.

    Attributes:
        playlist: The items in speaking order, or ``None`` when there is nothing to say.
        rejected: Segments left out (unknown fragment, invalid name, empty text), for logging.
    """

    playlist: Playlist | None
    rejected: tuple[RejectedSegment, ...] = ()


def static_fragment_key(name: str) -> str:
    """``static:<name>`` for a bare fragment name; a full ``static:*`` key is returned unchanged.

    Raises:
        PlaylistError: the name is empty or not a valid key.
    """
    name = name.strip() if isinstance(name, str) else name
    if not isinstance(name, str) or not name:
        raise PlaylistError(f"fragment name must be a non-empty string, got {name!r}")
    return StaticItem(name if name.startswith(STATIC_PREFIX) else STATIC_PREFIX + name).key


def sentence_items(text: str, *, min_chars: int = 10, max_chars: int = 200) -> list[TTSItem]:
    """Free text as one :class:`TTSItem` per sentence (see :class:`SentenceSplitter`)."""
    splitter = SentenceSplitter(min_chars=min_chars, max_chars=max_chars)
    pieces = splitter.feed(text)
    last = splitter.flush()
    if last is not None:
        pieces.append(last)
    items: list[TTSItem] = []
    for piece in pieces:
        try:
            items.append(TTSItem(piece))
        except PlaylistError:
            continue  # only characters that normalize away: nothing to say
    return items


def segment_items(
    segments: Iterable[Segment | Mapping[str, object]],
    *,
    known_static: Collection[str] | None = None,
) -> tuple[list[PlaylistItem], list[RejectedSegment]]:
    """Turn segments (models, or raw mappings as a streaming parser delivers them) into items.

    Args:
        segments: ``StaticSegment``/``TTSSegment`` or mappings ``{"static": ...}``/``{"tts": ...}``.
        known_static: Keys of the fragments that exist (``static:*``); a segment naming another one
            is rejected. ``None`` accepts any valid name (the player falls back to the transcript
            or skips a fragment that turns out to be missing).

    Returns:
        The items in order, and the rejected segments.
    """
    items: list[PlaylistItem] = []
    rejected: list[RejectedSegment] = []
    for index, raw in enumerate(segments):
        segment = _as_segment(raw)
        if segment is None:
            rejected.append(RejectedSegment(index, repr(raw)[:200], "not a {'static': ...} or {'tts': ...}"))
            continue
        if isinstance(segment, StaticSegment):
            try:
                key = static_fragment_key(segment.static)
            except DomainError as exc:
                rejected.append(RejectedSegment(index, f"static:{segment.static}", str(exc)))
                continue
            if known_static is not None and key not in known_static:
                rejected.append(RejectedSegment(index, key, "no such fragment in the manifest"))
                continue
            items.append(StaticItem(key))
        else:
            try:
                items.append(TTSItem(segment.tts))
            except PlaylistError as exc:
                rejected.append(RejectedSegment(index, f"tts:{segment.tts[:200]}", str(exc)))
    return items, rejected


def playlist_from_response(
    response: LLMStructuredResponse,
    *,
    known_static: Collection[str] | None = None,
    min_chars: int = 10,
    max_chars: int = 200,
) -> HybridPlaylist:
    """The playlist of a structured answer: ``answer`` sentence by sentence, then the segments.

    The free text is cut into sentences (one synthesis each, so the first one starts early and each
    is cached on its own). Works for a plain :class:`LLMStructuredResponse` too (answer only).

    Args:
        response: The validated answer.
        known_static: See :func:`segment_items`.
        min_chars: Shortest sentence synthesized on its own (shorter ones are merged).
        max_chars: Longest piece of free text synthesized at once.

    Returns:
        The playlist (``None`` when nothing is left to say) and the rejected segments.
    """
    items: list[PlaylistItem] = []
    items.extend(sentence_items(response.answer, min_chars=min_chars, max_chars=max_chars))
    rejected: list[RejectedSegment] = []
    if isinstance(response, HybridStructuredResponse):
        more, rejected = segment_items(response.segments, known_static=known_static)
        items.extend(more)
    return HybridPlaylist(Playlist(tuple(items)) if items else None, tuple(rejected))


def spoken_text(response: LLMStructuredResponse, transcripts: Mapping[str, str]) -> str:
    """What the reply says, as text (for the conversation history): answer, then each segment.

    A static segment contributes its manifest transcript (``transcripts`` maps ``static:*`` keys
    to text); one without a transcript or with an invalid name contributes nothing.
    """
    parts = [response.answer.strip()]
    if isinstance(response, HybridStructuredResponse):
        for segment in response.segments:
            if isinstance(segment, TTSSegment):
                parts.append(segment.tts.strip())
                continue
            try:
                parts.append(transcripts.get(static_fragment_key(segment.static), "").strip())
            except DomainError:
                continue
    return " ".join(part for part in parts if part)


def _as_segment(raw: object) -> Segment | None:
    if isinstance(raw, StaticSegment | TTSSegment):
        return raw
    if isinstance(raw, Mapping) and len(raw) == 1:
        if isinstance(raw.get("static"), str):
            return StaticSegment(static=str(raw["static"]))
        if isinstance(raw.get("tts"), str):
            return TTSSegment(tts=str(raw["tts"]))
    return None


# -- metrics ------------------------------------------------------------------------------------------

ItemSource: TypeAlias = Literal["hit", "miss", "tts", "skipped", "silence"]
TurnOutcome: TypeAlias = Literal["ok", "degraded", "closed", "failed"]


@dataclass(frozen=True, slots=True)
class HybridTurnMetrics:
    """The numbers of one played reply (one ``hybrid_turn`` log line, one ``voxcore.hybrid.playlist`` span).

    Attributes:
        items: Items played or attempted (pauses included).
        time_to_first_audio_ms: Turn start -> first audio chunk of the reply. The turn starts when
            the caller says so (``turn_started_at``: for an LLM-driven reply, when the user's turn
            began, so the LLM is included); by default when the reply started (``None``: no audio).
        playlist_first_audio_ms: The reply's own start (``play``/``speak_text_stream`` called) ->
            its first audio chunk: what the cache and the engines cost, without the LLM.
        total_ms: Start -> end of the reply (or of the consumer's reading, when it stopped early).
        hits: Items played from the cache (static fragments and cached syntheses).
        misses: Items synthesized now (TTS cache misses and static fragments spoken from their
            transcript).
        tts_ttfb_ms: The engine's time to first byte for the first synthesized item, in playing
            order (``None``: nothing was synthesized).
        converted: Items whose stored format differed from the target and were converted.
        skipped: Items left out (a static fragment missing without a transcript, unusable audio).
        failed: Items that ended early because their synthesis failed.
        chunks: Audio chunks handed out.
        outcome: ``ok`` (every item played as asked); ``degraded`` (the reply played to its end,
            but items were skipped, substituted or cut short: see ``degraded_items``); ``closed``
            (the consumer stopped reading or was cancelled); ``failed``.
        degraded_items: One ``"<index>:<key or kind>:<what happened>"`` per item that did not play
            as asked (``skipped``, ``substituted by tts``, ``failed``).
        voices: Who spoke the reply, in order of first appearance: ``static`` for recorded
            fragments, ``<engine>/<voice>`` (``espeak-ng/ru``) for synthesized parts.
    """

    items: int
    time_to_first_audio_ms: float | None
    playlist_first_audio_ms: float | None
    total_ms: float
    hits: int
    misses: int
    tts_ttfb_ms: float | None
    converted: int
    skipped: int
    failed: int
    chunks: int
    outcome: TurnOutcome
    degraded_items: tuple[str, ...] = ()
    voices: tuple[str, ...] = ()

    def fields(self) -> dict[str, int | float | str | tuple[str, ...]]:
        """The metrics as log fields; unknown values (``None``) and empty lists are left out.

        The same keys, prefixed with :data:`TURN_ATTRIBUTE_PREFIX`, are the span attributes
        (:meth:`span_attributes`), so a log line and its span always describe a turn alike.
        """
        return {name: value for name, value in asdict(self).items() if value is not None and value != ()}

    def span_attributes(self) -> dict[str, int | float | str | tuple[str, ...]]:
        """:meth:`fields` with every key prefixed by :data:`TURN_ATTRIBUTE_PREFIX`."""
        return {TURN_ATTRIBUTE_PREFIX + name: value for name, value in self.fields().items()}
