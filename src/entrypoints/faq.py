"""Read a FAQ manifest file (YAML or JSON) into :class:`FaqEntry` entries (``voxcore.core.domain.faq``)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from voxcore.core.domain.faq import FaqEntry, FaqError, parse_faq
from voxcore.core.ports.errors import ConfigurationError


def read_faq_manifest(path: Path) -> list[FaqEntry]:
    """Load and validate ``path``.

    Raises:
        ConfigurationError: unreadable, not YAML/JSON, or not a valid FAQ manifest (names the file).
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read FAQ manifest {path}: {exc}") from exc
    try:
        return parse_faq(data)
    except FaqError as exc:
        raise ConfigurationError(f"invalid FAQ manifest {path}: {exc}") from exc
