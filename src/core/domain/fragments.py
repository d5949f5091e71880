"""Fragment manifests: which WAV file becomes which ``static:*`` key, and what it says."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.keys import STATIC_PREFIX, check_key, static_key


class ManifestError(DomainError):
    """A fragment manifest that cannot be used; the message names the entry."""


@dataclass(frozen=True, slots=True)
class FragmentSpec:
    """One pre-recorded fragment.

    Attributes:
        key: Its cache key (always ``static:*``).
        file: The WAV file, resolved against the manifest's folder.
        transcript: What the fragment says (lets TTS stand in when the audio is missing).
    """

    key: str
    file: PurePath
    transcript: str = ""


def parse_manifest(data: Any, base_dir: PurePath) -> list[FragmentSpec]:
    """Validate a loaded manifest (``{"fragments": [...]}`` or a bare list) into specs.

    Each entry needs ``key`` (``static:`` is added when missing) and ``file`` (relative paths are
    resolved against ``base_dir``); ``transcript`` is optional. Keys must be unique.

    Raises:
        ManifestError: wrong structure, a missing field, a bad key, or a duplicate key.
    """
    entries = data.get("fragments") if isinstance(data, Mapping) else data
    if not isinstance(entries, list):
        raise ManifestError("manifest must be a list of fragments or a mapping with a 'fragments' list")
    specs: list[FragmentSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ManifestError(f"fragment #{index} must be a mapping with 'key' and 'file'")
        unknown = set(entry) - {"key", "file", "transcript"}
        if unknown:
            raise ManifestError(f"fragment #{index} has unknown fields: {sorted(unknown)}")
        key, file, transcript = entry.get("key"), entry.get("file"), entry.get("transcript", "")
        if not isinstance(key, str) or not key:
            raise ManifestError(f"fragment #{index} needs a non-empty 'key'")
        if not isinstance(file, str) or not file:
            raise ManifestError(f"fragment #{index} ({key}) needs a 'file'")
        if not isinstance(transcript, str):
            raise ManifestError(f"fragment #{index} ({key}): 'transcript' must be text")
        full_key = check_key(key if key.startswith(STATIC_PREFIX) else static_key(key))
        if full_key in seen:
            raise ManifestError(f"fragment #{index}: duplicate key {full_key}")
        seen.add(full_key)
        path = PurePath(file)
        specs.append(FragmentSpec(full_key, path if path.is_absolute() else base_dir / path, transcript))
    return specs
