"""Callables that import their target on first call: the composition root stays cheap to import.

``import voxcore.entrypoints.container`` must not pull in numpy, soxr, redis, httpx or tiktoken: a
host imports it at start-up, and a CLI command that never speaks should not pay for the voice
stack. The container therefore refers to its adapters and use cases through :func:`lazy`
stand-ins (type checkers see the real names).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy(module: str, name: str) -> Callable[..., Any]:
    """A callable that imports ``module`` on its first call and forwards to ``module.name``.

    Args:
        module: Dotted module path, e.g. ``voxcore.adapters.redis.cache``.
        name: A class or function of that module.
    """
    target: Callable[..., Any] | None = None

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal target
        if target is None:
            target = getattr(importlib.import_module(module), name)
        return target(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__module__ = module
    call.__doc__ = f"Imports {module} on first use, then calls {name}."
    return call
