"""The httpx client an adapter builds for itself when the host injects none."""

from __future__ import annotations

import httpx

from voxcore.core.ports.errors import ConfigurationError


def owned_async_client(
    *, http2: bool, timeout: httpx.Timeout, max_keepalive: int, label: str
) -> httpx.AsyncClient:
    """A keep-alive ``httpx.AsyncClient`` for one adapter.

    Raises:
        ConfigurationError: ``http2=True`` without the ``h2`` package; the message names ``label``.
    """
    try:
        return httpx.AsyncClient(
            http2=http2,
            timeout=timeout,
            limits=httpx.Limits(max_keepalive_connections=max_keepalive, keepalive_expiry=60.0),
        )
    except ImportError as exc:  # http2=True without the h2 package
        raise ConfigurationError(f"{label}: http2=True needs httpx[http2] ({exc})") from exc
