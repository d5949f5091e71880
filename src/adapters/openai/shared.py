"""Opt-in shared LLM connection: one warm client per provider for the whole process, not one per call.

By default every call owns an :class:`OpenAIConnectionManager` (its own connection, handshake and warm-up
loop), which isolates calls from each other. A worker carrying hundreds of calls can instead share one
client per provider (``llm.shared_connection: true``): over TLS with HTTP/2 the calls' requests are
multiplexed as streams of one connection (more connections open only past the server's stream limit);
over plain HTTP/1.1 they share a keep-alive pool of up to ``max_connections`` connections. One handshake
and one warm-up loop serve every call, and a call's start costs nothing once the provider is warm.

The trade-off: a broken shared connection fails the turns of every call that uses it at that moment
(each gets its typed ``LLMError``, as with its own connection), and one slow provider connection is felt
by all calls; ``connection_reused`` is true for almost every request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import httpx

from voxcore.adapters.openai.config import OpenAIConfig
from voxcore.adapters.openai.connection import OpenAIConnectionManager
from voxcore.core.ports.llm import LLMConnectionManager

__all__ = ["SharedConnectionHandle", "SharedConnections"]


class SharedConnections:
    """The process's shared warm clients, one per provider configuration.

    Args:
        max_connections: Pool bound of each shared client (HTTP/1.1: concurrent requests; HTTP/2:
            connections opened past the server's concurrent-stream limit).
        ssl_context: TLS settings (default: the process-wide context).
    """

    def __init__(self, *, max_connections: int = 1024, ssl_context: ssl.SSLContext | None = None) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be >= 1, got {max_connections}")
        self._max_connections = max_connections
        self._ssl_context = ssl_context
        self._managers: dict[OpenAIConfig, OpenAIConnectionManager] = {}
        self._closed = False

    @property
    def providers(self) -> int:
        """Shared clients made so far."""
        return len(self._managers)

    def handle(self, config: OpenAIConfig) -> SharedConnectionHandle:
        """One call's handle on the shared client of ``config``'s provider.

        Raises:
            RuntimeError: the shared connections are closed.
        """
        if self._closed:
            raise RuntimeError("the shared LLM connections are closed")
        manager = self._managers.get(config)
        if manager is None:
            pooled = dataclasses.replace(
                config,
                max_connections=self._max_connections,
                max_keepalive_connections=self._max_connections,
            )
            manager = OpenAIConnectionManager(pooled, ssl_context=self._ssl_context)
            self._managers[config] = manager
        return SharedConnectionHandle(manager)

    async def aclose(self) -> None:
        """Stop every shared warm-up loop and close every shared client; safe to call twice."""
        self._closed = True
        managers, self._managers = list(self._managers.values()), {}
        await asyncio.gather(*(m.shutdown() for m in managers), return_exceptions=True)


class SharedConnectionHandle(LLMConnectionManager[httpx.AsyncClient]):
    """A call's view of a shared client: starting shares one handshake; shutting down releases only.

    Args:
        manager: The process-wide manager of the provider (owned by :class:`SharedConnections`).
    """

    def __init__(self, manager: OpenAIConnectionManager) -> None:
        self._manager = manager
        self._released = False

    @property
    def shared_manager(self) -> OpenAIConnectionManager:
        """The process-wide manager behind this handle."""
        return self._manager

    async def start(self) -> None:
        """Warm the shared client (one handshake for the process; a no-op once it is warm)."""
        self._check()
        await self._manager.start()

    async def get_client(self) -> httpx.AsyncClient:
        """The shared warm client."""
        self._check()
        return await self._manager.get_client()

    async def shutdown(self) -> None:
        """Release this call's use of the shared client (which stays open for the other calls)."""
        self._released = True

    def _check(self) -> None:
        if self._released:
            raise RuntimeError("this call's connection handle is shut down")
