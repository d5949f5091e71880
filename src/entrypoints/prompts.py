"""Load the LLM prompts (``prompts.yml``) named by the settings, or the shipped defaults."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.prompting import Prompts
from voxcore.core.ports.errors import ConfigurationError
from voxcore.entrypoints.settings import Settings


def default_prompts_path() -> Path:
    """The prompts shipped with voxcore."""
    return Path(str(resources.files("voxcore.entrypoints") / "assets" / "prompts.yml"))


def prompts_path(settings: Settings) -> Path:
    """``llm.prompts_path`` resolved against the config file's folder (never the working directory)."""
    configured = settings.llm.prompts_path
    if not configured:
        return default_prompts_path()
    path = Path(configured)
    if not path.is_absolute():
        if settings.base_dir is None:
            raise ConfigurationError(
                f"llm.prompts_path {configured!r} is relative, but there is no config file to resolve it "
                "against: give an absolute path"
            )
        path = Path(settings.base_dir) / path
    return path


def load_prompts(settings: Settings) -> Prompts:
    """Read and validate the prompts file.

    Raises:
        ConfigurationError: unreadable file, invalid YAML, or missing/unknown/blank prompts.
    """
    path = prompts_path(settings)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(f"cannot read prompts file {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"prompts file {path} is not valid YAML: {exc}") from exc
    try:
        return Prompts.from_mapping(data)
    except DomainError as exc:
        raise ConfigurationError(f"invalid prompts file {path}: {exc}") from exc
