"""Tokenizer port: counting tokens of text and chat messages for context-usage estimates."""

from __future__ import annotations

import abc

from voxcore.core.domain.models import ConversationMessage


class Tokenizer(abc.ABC):
    """Counts tokens the way the target model does (or as close as the implementation can).

    Attributes:
        name: What counts (e.g. ``tiktoken:cl100k_base`` or ``heuristic:chars/4``).
        exact: False for an approximation (a logged last resort).
    """

    name: str = "unknown"
    exact: bool = False

    @abc.abstractmethod
    def count(self, text: str) -> int:
        """Tokens in ``text``."""

    def count_message(self, message: ConversationMessage) -> int:
        """Tokens one chat message costs in a request: its content plus the per-message framing.

        OpenAI chat formats spend about 4 tokens per message on role and delimiters.
        """
        return self.count(message["content"]) + 4
