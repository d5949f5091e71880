"""What a hybrid reply reports about each item it played (for live events, dashboards, analytics)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeAlias

from voxcore.core.domain.hybrid import ItemSource


@dataclass(frozen=True, slots=True)
class PlayedItem:
    """One item of a hybrid reply, once it has played (or was skipped).

    Attributes:
        index: Its position in the reply.
        kind: The item: ``static`` (a recorded fragment), ``tts`` (text to speak) or ``pause``.
        key: Its cache key (``static:*`` / ``tts:*``; ``None`` for a pause).
        source: Where its audio came from: ``hit`` (the cache), ``miss`` (not cached: synthesized),
            ``tts`` (a static fragment missing from the cache, spoken from its transcript),
            ``skipped`` (nothing could be played), ``silence`` (a pause).
        chunks: Chunks of it handed out.
        first_byte_ms: From the item's start to its first audio (``None``: no audio).
    """

    index: int
    kind: str
    key: str | None
    source: ItemSource
    chunks: int
    first_byte_ms: float | None


#: Called once per played item, after it played: off the audio path, must not block or raise.
PlayedItemObserver: TypeAlias = Callable[[PlayedItem], None]
