"""LLM ports (SPEC-LLM-1 §3): connection manager, streaming client, context, conversation manager.

The ports speak domain types only. The HTTP client a connection manager hands out is opaque here
(``ClientT``); the OpenAI adapter binds it to ``httpx.AsyncClient``.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pydantic import BaseModel

from voxcore.core.domain.models import ConversationHistory, ConversationMessage, LLMStreamChunk

ClientT = TypeVar("ClientT")
#: What ``stream_structured_generate`` accepts as the prompt: chat messages, or one text (sent as
#: a single user message).
Prompt = str | Sequence[ConversationMessage]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts a provider reported for one request."""

    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class GenerationResult:
    """What a finished structured stream produced (available after its final chunk).

    Attributes:
        response: The validated response model instance.
        text: The streamed answer text, in full.
        usage: Provider-reported tokens, when the provider sent them.
        ttft_ms: Request sent -> first content token.
        total_ms: Request sent -> end of stream.
        chunks: Content chunks received.
        connection_reused: Whether the request went over an already open connection, when known.
    """

    response: BaseModel
    text: str
    usage: TokenUsage | None
    ttft_ms: float
    total_ms: float
    chunks: int
    connection_reused: bool | None = None


class LLMConnectionManager(abc.ABC, Generic[ClientT]):
    """Owns one call's warm HTTP connection to the provider (SPEC-LLM-1 §4.1)."""

    @abc.abstractmethod
    async def start(self) -> None:
        """Create the client, do the handshake, and start the periodic warm-up."""

    @abc.abstractmethod
    async def get_client(self) -> ClientT:
        """A client whose connection is already open and warm (starts the manager if needed)."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Stop the warm-up loop and close the client; safe to call twice."""


class AbstractLLMClient(abc.ABC, Generic[ClientT]):
    """Streams a structured answer from a chat-completions endpoint (SPEC-LLM-1 §4.2)."""

    @abc.abstractmethod
    def stream_structured_generate(
        self,
        http_client: ClientT,
        full_prompt: Prompt,
        model: str,
        response_model: type[BaseModel],
    ) -> AsyncGenerator[LLMStreamChunk, None]:
        """Stream the answer of ``response_model``'s ``answer`` field as it is generated.

        The first chunk carries the safety metadata (``is_safe``, ``aggression_score``); answer text
        is never yielded before it. The last chunk has ``is_final_chunk=True``; after it,
        :attr:`last_result` describes the whole generation.

        Raises:
            LLMError: a typed provider/protocol error; the connection is released either way.
        """

    @abc.abstractmethod
    async def generate_text(
        self, http_client: ClientT, prompt: Prompt, model: str, *, max_tokens: int | None = None
    ) -> str:
        """A plain-text completion (used for summaries); raises ``LLMError`` like the stream does."""

    @property
    @abc.abstractmethod
    def last_result(self) -> GenerationResult | None:
        """The result of the most recent completed stream of this client (``None`` before any)."""

    @property
    def last_ttft_ms(self) -> float | None:
        """Request sent -> first token of the most recent stream, set as soon as that token arrives.

        Unlike :attr:`last_result` it is known for a stream that later failed or was closed early (an
        unsafe answer); ``None`` while a new stream still waits for its first token, or when the
        client does not measure it (this default).
        """
        return None


class AbstractLLMContext(abc.ABC):
    """One conversation's history and prompt assembly (SPEC-LLM-1 §4.3)."""

    @abc.abstractmethod
    def add_message(self, message: ConversationMessage) -> None:
        """Append a message (counted once, incrementally) and log ``usage_ratio``."""

    @abc.abstractmethod
    def build_prompt(self) -> ConversationHistory:
        """System prompt + history + response format instruction, as chat messages."""

    @abc.abstractmethod
    def build_summary_prompt(self, history: Sequence[ConversationMessage]) -> ConversationHistory:
        """The messages that ask the LLM to summarize ``history``."""

    @abc.abstractmethod
    def get_history_for_summary(self) -> ConversationHistory:
        """A snapshot of the history a summary should cover (a copy)."""

    @abc.abstractmethod
    def estimate_usage_ratio(self) -> float:
        """Tokens of :meth:`build_prompt` divided by the model's context window (0..1+)."""


class AbstractConversationManager(abc.ABC):
    """One call's conversation: turns in, streamed structured answers out (SPEC-LLM-1 §4.5)."""

    @abc.abstractmethod
    def process_user_turn(self, final_user_text: str) -> AsyncGenerator[LLMStreamChunk, None]:
        """Add the user's text, stream the answer, and end with a chunk marked ``is_final_chunk``."""

    @abc.abstractmethod
    async def shutdown(self) -> None:
        """Cancel background work and release the call's connections; safe to call twice."""
