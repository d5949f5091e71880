"""Hybrid reply playlists (recorded fragments + synthesized parts + pauses) and PCM joining rules."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from voxcore.core.domain.audio import AudioFormat, plan_chunks
from voxcore.core.domain.errors import DomainError, InvalidKeyError
from voxcore.core.domain.keys import check_key, is_static
from voxcore.core.domain.tts_text import normalize_tts_text

#: Longest pause a playlist may hold: anything longer is dead air on a phone line.
MAX_PAUSE_MS = 10_000

# Byte value of one silent sample in single-byte encodings: 8-bit WAV is unsigned (midpoint 0x80)
# and G.711 telephony codecs encode zero as 0xFF (mu-law) or 0xD5 (A-law). Every other encoding
# (signed little-endian PCM, float) is silent at all-zero bytes.
_SILENT_BYTE = {
    "pcm_u8": 0x80,
    "pcm_mulaw": 0xFF,
    "mulaw": 0xFF,
    "ulaw": 0xFF,
    "pcm_alaw": 0xD5,
    "alaw": 0xD5,
}


class PlaylistError(DomainError):
    """A playlist or playlist item that breaks the rules; the message says which and why."""


@dataclass(frozen=True, slots=True)
class StaticItem:
    """A pre-recorded fragment, played from the cache.

    Attributes:
        key: Its cache key; must be a valid ``static:*`` key.
    """

    key: str

    def __post_init__(self) -> None:
        try:
            check_key(self.key)
        except InvalidKeyError as exc:
            raise PlaylistError(f"static item: {exc}") from exc
        if not is_static(self.key) or self.key == "static:":
            raise PlaylistError(f"static item key must look like 'static:<name>', got {self.key!r}")


@dataclass(frozen=True, slots=True)
class TTSItem:
    """A dynamic part (a number, a date, a name) synthesized or taken from the TTS cache.

    The text is stored normalized (:func:`~voxcore.core.domain.tts_text.normalize_tts_text`), so
    what is spoken is exactly what the ``tts:*`` cache key describes.

    Attributes:
        text: The canonical text to speak.
    """

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise PlaylistError(f"TTS item text must be str, got {type(self.text).__name__}")
        normalized = normalize_tts_text(self.text)
        if not normalized:
            raise PlaylistError(f"TTS item text is empty once normalized: {self.text!r}")
        object.__setattr__(self, "text", normalized)


@dataclass(frozen=True, slots=True)
class PauseItem:
    """Silence between two parts.

    Attributes:
        ms: Its length in milliseconds, ``0 < ms <= MAX_PAUSE_MS``.
    """

    ms: int

    def __post_init__(self) -> None:
        if isinstance(self.ms, bool) or not isinstance(self.ms, int):
            raise PlaylistError(f"pause length must be an int of milliseconds, got {self.ms!r}")
        if not 0 < self.ms <= MAX_PAUSE_MS:
            raise PlaylistError(f"pause must be 1..{MAX_PAUSE_MS} ms, got {self.ms}")


PlaylistItem = StaticItem | TTSItem | PauseItem
_ITEM_TYPES = (StaticItem, TTSItem, PauseItem)


@dataclass(frozen=True, slots=True)
class Playlist:
    """The ordered parts of one hybrid reply (SPEC cache §3), e.g. intro + amount + unit.

    Items validate themselves when built; the playlist checks it is a non-empty tuple of them.

    Attributes:
        items: The parts, played in order.
    """

    items: tuple[PlaylistItem, ...]

    def __post_init__(self) -> None:
        if isinstance(self.items, list):
            object.__setattr__(self, "items", tuple(self.items))
        if not isinstance(self.items, tuple):
            raise PlaylistError(f"playlist items must be a tuple, got {type(self.items).__name__}")
        if not self.items:
            raise PlaylistError("a playlist needs at least one item")
        for index, item in enumerate(self.items):
            if not isinstance(item, _ITEM_TYPES):
                raise PlaylistError(f"playlist item #{index} is {type(item).__name__}, not a playlist item")

    @classmethod
    def of(cls, *items: PlaylistItem) -> Playlist:
        """``Playlist.of(a, b, c)`` is ``Playlist((a, b, c))``."""
        return cls(items)

    def __iter__(self) -> Iterator[PlaylistItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def static_keys(self) -> tuple[str, ...]:
        """The ``static:*`` keys in play order (duplicates kept), for prefetching."""
        return tuple(item.key for item in self.items if isinstance(item, StaticItem))

    @property
    def tts_texts(self) -> tuple[str, ...]:
        """The normalized texts to synthesize, in play order."""
        return tuple(item.text for item in self.items if isinstance(item, TTSItem))


def can_join(a: AudioFormat, b: AudioFormat) -> bool:
    """True when PCM in format ``b`` may be appended to PCM in format ``a`` byte for byte.

    Concatenation has no header to renegotiate, so every layout field must be the same: sample
    rate, channels, sample width and encoding. Anything else needs conversion first.
    """
    return (
        a.sample_rate == b.sample_rate
        and a.channels == b.channels
        and a.sample_width == b.sample_width
        and a.encoding == b.encoding
    )


def silence(fmt: AudioFormat, ms: int) -> bytes:
    """``ms`` milliseconds of digital silence in ``fmt``: ``sample_rate * ms // 1000`` whole frames.

    The zero level depends on the encoding: 0x80 for unsigned 8-bit PCM (``pcm_u8``), 0xFF/0xD5
    for G.711 mu-law/A-law, all-zero bytes otherwise.

    Raises:
        PlaylistError: ``ms`` is not a non-negative int.
    """
    if isinstance(ms, bool) or not isinstance(ms, int) or ms < 0:
        raise PlaylistError(f"silence length must be a non-negative int of milliseconds, got {ms!r}")
    nbytes = fmt.sample_rate * ms // 1000 * fmt.frame_size
    level = _SILENT_BYTE.get(fmt.encoding, 0)
    return bytes([level]) * nbytes if level else bytes(nbytes)


class Rechunker:
    """Cuts a PCM stream delivered in pieces of any size into fixed chunks of whole frames.

    ``feed`` returns every chunk that is complete; ``flush`` returns what is left at the end of the
    stream. The chunks are exactly those :func:`~voxcore.core.domain.audio.split_pcm` makes of the
    whole stream at once, however it was split into pieces. Work is linear in the bytes fed: only
    the short remainder (less than one chunk) is ever copied twice.

    Args:
        fmt: Layout of the stream (a chunk is ``plan_chunks(fmt, chunk_ms).bytes_per_chunk``).
        chunk_ms: Chunk length in milliseconds (SPEC-C: 20).

    Raises:
        InvalidAudioError: ``chunk_ms`` is not a positive int.
    """

    __slots__ = ("_buffer", "_frame", "_step")

    def __init__(self, fmt: AudioFormat, chunk_ms: int = 20) -> None:
        self._step = plan_chunks(fmt, chunk_ms).bytes_per_chunk
        self._frame = fmt.frame_size
        self._buffer = bytearray()

    @property
    def chunk_bytes(self) -> int:
        """Size of every chunk but the last."""
        return self._step

    @property
    def pending(self) -> int:
        """Bytes held back until the next chunk is complete (always less than one chunk)."""
        return len(self._buffer)

    def feed(self, piece: bytes | bytearray | memoryview) -> list[bytes]:
        """Take the next piece of the stream; return the chunks it completes (possibly none)."""
        step, buffer = self._step, self._buffer
        view = memoryview(piece).cast("B")
        chunks: list[bytes] = []
        start = 0
        if buffer:
            # Complete the pending chunk first; the rest is cut straight out of the piece.
            start = min(step - len(buffer), len(view))
            buffer += view[:start]
            if len(buffer) < step:
                return chunks
            chunks.append(bytes(buffer))
            buffer.clear()
        end = start + (len(view) - start) // step * step
        chunks.extend(bytes(view[i : i + step]) for i in range(start, end, step))
        buffer += view[end:]
        return chunks

    def flush(self) -> bytes | None:
        """End of stream: the last, short chunk (whole frames only), or ``None`` when nothing is left.

        A trailing partial frame cannot be played and is dropped. The rechunker is empty afterwards
        and may be reused for another stream.
        """
        tail = len(self._buffer) - len(self._buffer) % self._frame
        rest = bytes(self._buffer[:tail])
        self._buffer.clear()
        return rest or None

    def rechunk(self, pieces: Iterable[bytes]) -> Iterator[bytes]:
        """Feed every piece and flush: all chunks of a finished stream, lazily."""
        for piece in pieces:
            yield from self.feed(piece)
        last = self.flush()
        if last is not None:
            yield last
