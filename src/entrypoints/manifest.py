"""Read a fragment manifest file (YAML or JSON) into :class:`FragmentSpec` entries."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import yaml

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.fragments import FragmentSpec, parse_manifest
from voxcore.core.ports.errors import ConfigurationError


def read_manifest(path: Path) -> list[FragmentSpec]:
    """Load and validate ``path``; file paths inside resolve against its folder.

    Raises:
        ConfigurationError: unreadable, not YAML/JSON, or not a valid manifest (names the file).
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ConfigurationError(f"cannot read manifest {path}: {exc}") from exc
    try:
        return parse_manifest(data, path.resolve().parent)
    except DomainError as exc:
        raise ConfigurationError(f"invalid manifest {path}: {exc}") from exc


def numbers_manifest_path() -> Path:
    """The shipped number fragment pack's manifest (``assets/manifest_numbers.yml``)."""
    return Path(str(resources.files("voxcore.entrypoints") / "assets" / "manifest_numbers.yml"))

