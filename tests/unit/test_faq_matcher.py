"""FaqMatcher with a hand-written embeddings fake: cosine matching, threshold, soft failures, lazy numpy."""

from __future__ import annotations

import asyncio
import logging
import math
import subprocess
import sys
from collections.abc import Mapping, Sequence

import pytest

from voxcore.application.faq import FaqMatcher
from voxcore.core.domain.embeddings import Embedding
from voxcore.core.domain.faq import FaqError, parse_faq
from voxcore.core.ports.embeddings import Embeddings
from voxcore.core.ports.errors import EmbeddingError
from voxcore.events import FIELDS_ATTR


class TableEmbeddings(Embeddings):
    """Vectors from a table (unknown texts: an orthogonal direction)."""

    model = "table"

    def __init__(self, table: Mapping[str, Sequence[float]]) -> None:
        self.table = dict(table)
        self.calls = 0
        self.delay = 0.0
        self.error: Exception | None = None

    async def embed(self, texts: Sequence[str]) -> list[Embedding]:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return [Embedding.from_floats(self.model, self.table.get(t, (0.0, 0.0, 0.0, 1.0))) for t in texts]

    async def aclose(self) -> None:
        pass


ENTRIES = parse_faq(
    {
        "faq": [
            {"id": "hours", "questions": ["hours?", "schedule?"], "text": "Nine to nine."},
            {"id": "price", "questions": ["price?"], "text": "Three hundred."},
        ]
    }
)


def unit_at(cosine: float) -> tuple[float, float, float, float]:
    """A vector whose cosine with (1, 0, 0, 0) is ``cosine`` (scaled: norms must not matter)."""
    return (2 * cosine, 2 * math.sqrt(1 - cosine**2), 0.0, 0.0)


TABLE = {
    "hours?": (1.0, 0.0, 0.0, 0.0),
    "schedule?": (0.0, 0.0, 3.0, 0.0),
    "price?": (0.0, 1.0, 0.0, 0.0),
    "close": unit_at(0.93),
    "far": unit_at(0.85),
    "sched": (0.0, 0.1, 1.0, 0.0),
}


async def started(threshold: float = 0.9, **kwargs: object) -> tuple[FaqMatcher, TableEmbeddings]:
    emb = TableEmbeddings(TABLE)
    matcher = FaqMatcher(embeddings=emb, entries=ENTRIES, threshold=threshold, **kwargs)  # type: ignore[arg-type]
    await matcher.start()
    return matcher, emb


async def test_best_phrasing_and_threshold() -> None:
    matcher, emb = await started(0.9)
    assert emb.calls == 1  # every phrasing in one batch
    hit = await matcher.match("close")
    assert hit is not None and hit.hit and hit.entry.id == "hours" and hit.question == "hours?"
    assert hit.score == pytest.approx(0.93, abs=1e-5)
    miss = await matcher.match("far")
    assert miss is not None and not miss.hit and miss.entry.id == "hours"
    second = await matcher.match("sched")
    assert second is not None and second.hit and second.question == "schedule?"
    lower, _ = await started(0.8)
    far = await lower.match("far")
    assert far is not None and far.hit  # a lower threshold answers more (and risks false matches)


async def test_start_is_idempotent_and_required() -> None:
    emb = TableEmbeddings(TABLE)
    matcher = FaqMatcher(embeddings=emb, entries=ENTRIES, threshold=0.9)
    with pytest.raises(RuntimeError, match="start"):
        await matcher.match("close")
    await matcher.start()
    await matcher.start()
    assert emb.calls == 1 and matcher.started


async def test_provider_failure_and_timeout_are_soft(caplog: pytest.LogCaptureFixture) -> None:
    matcher, emb = await started(0.9, timeout_s=0.05)
    emb.error = EmbeddingError("down", transient=True)
    with caplog.at_level(logging.WARNING, logger="voxcore.faq"):
        assert await matcher.match("close") is None
        emb.error = None
        emb.delay = 0.5
        assert await matcher.match("close") is None
    failures = [getattr(r, FIELDS_ATTR) for r in caplog.records if r.getMessage() == "faq_match_failed"]
    assert [f["error_type"] for f in failures] == ["EmbeddingError", "TimeoutError"]
    assert await matcher.match("   ") is None


async def test_dimension_mismatch_is_an_error() -> None:
    matcher, _ = await started()
    with pytest.raises(EmbeddingError, match="dimension"):
        matcher.best(Embedding.from_floats("table", [1.0, 0.0]).data)


def test_construction_rules() -> None:
    emb = TableEmbeddings(TABLE)
    with pytest.raises(FaqError):
        FaqMatcher(embeddings=emb, entries=[], threshold=0.9)
    with pytest.raises(FaqError):
        FaqMatcher(embeddings=emb, entries=ENTRIES, threshold=1.5)
    with pytest.raises(ValueError):
        FaqMatcher(embeddings=emb, entries=ENTRIES, threshold=0.9, timeout_s=0)


def test_importing_the_faq_modules_does_not_import_numpy() -> None:
    code = (
        "import sys; import voxcore.application.faq, voxcore.application.embedding_cache, "
        "voxcore.application.spoken; print('numpy' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
