"""One conversation context: its history, incremental token accounting and prompt assembly."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Final

from voxcore.core.domain.dual_context import oldest_turns_to_drop
from voxcore.core.domain.models import ConversationHistory, ConversationMessage, make_message
from voxcore.core.domain.prompting import (
    Prompts,
    assemble_prompt,
    format_message,
    summary_request,
    system_message,
)
from voxcore.core.ports.llm import AbstractLLMContext
from voxcore.core.ports.tokenizer import Tokenizer
from voxcore.events import emit

logger = logging.getLogger("voxcore.llm.context")

#: Tokens every chat completion spends priming the assistant's reply (OpenAI chat format).
REPLY_PRIMING_TOKENS: Final = 3


class LLMContext(AbstractLLMContext):
    """A conversation history whose prompt size is known at every moment, in O(1).

    Every message is counted once, when it is added; the system message (with the summary, if any)
    and the format instruction are counted once, at construction. :meth:`estimate_usage_ratio` is
    then a division, and :meth:`drop_oldest` subtracts the counts it already has.

    Stored messages are private copies and are never mutated, so prompts and snapshots may share
    them; callers must not mutate what they get either.

    Args:
        prompts: The prompt texts.
        tokenizer: Counts tokens the way the main model does.
        context_window_tokens: The main model's context window.
        history: Messages to start with (validated and counted like added ones).
        summary: Summary of the conversation before ``history`` (goes into the system message).
        name: Shown in this context's log events (``active``, ``standby``…).

    Raises:
        ValueError: ``context_window_tokens`` is not positive, or a history message is invalid.
    """

    def __init__(
        self,
        *,
        prompts: Prompts,
        tokenizer: Tokenizer,
        context_window_tokens: int,
        history: Sequence[ConversationMessage] = (),
        summary: str | None = None,
        name: str = "active",
    ) -> None:
        if isinstance(context_window_tokens, bool) or context_window_tokens <= 0:
            raise ValueError(f"context_window_tokens must be a positive int, got {context_window_tokens!r}")
        self._prompts = prompts
        self._tokenizer = tokenizer
        self._window = context_window_tokens
        self._summary = summary.strip() if summary is not None and summary.strip() else None
        self.name = name
        self._messages: ConversationHistory = []
        self._token_counts: list[int] = []
        self._fixed_tokens = (
            tokenizer.count_message(system_message(prompts, self._summary))
            + tokenizer.count_message(format_message(prompts))
            + REPLY_PRIMING_TOKENS
        )
        self._history_tokens = 0
        self._appended = 0
        for message in history:
            self._store(_checked(message))

    # -- AbstractLLMContext ------------------------------------------------------------------------

    def add_message(self, message: ConversationMessage) -> None:
        """Append a copy of ``message`` (counted once) and log ``usage_ratio``.

        Raises:
            ValueError: the message is not a dict with a known role and ``str`` content.
        """
        self.append(message)

    def build_prompt(self) -> ConversationHistory:
        """System message (with the summary), the history, then the response format instruction."""
        return assemble_prompt(self._prompts, self._messages, summary=self._summary)

    def build_summary_prompt(self, history: Sequence[ConversationMessage]) -> ConversationHistory:
        """The request for a summary of ``history`` that also folds in this context's own summary."""
        return summary_request(self._prompts, history, previous_summary=self._summary)

    def get_history_for_summary(self) -> ConversationHistory:
        """A copy of the history (new list, new message dicts)."""
        return [ConversationMessage(role=m["role"], content=m["content"]) for m in self._messages]

    def estimate_usage_ratio(self) -> float:
        """Prompt tokens / context window, in O(1)."""
        return (self._fixed_tokens + self._history_tokens) / self._window

    # -- the rest of the API -----------------------------------------------------------------------

    def append(self, message: ConversationMessage) -> ConversationMessage:
        """:meth:`add_message` that returns the stored copy (whose identity :meth:`remove_last` takes).

        Raises:
            ValueError: the message is not a dict with a known role and ``str`` content.
        """
        stored = self._store(_checked(message))
        emit(
            logger,
            "usage_ratio",
            logging.DEBUG,
            context=self.name,
            ratio=self.estimate_usage_ratio(),
            tokens=self.tokens,
            messages=len(self._messages),
        )
        return stored

    def remove_last(self, message: ConversationMessage) -> bool:
        """Remove the newest message if it is ``message`` (the very object :meth:`append` returned).

        Used to roll back a turn that produced nothing; anything older is never touched.

        Returns:
            True when the message was removed.
        """
        if not self._messages or self._messages[-1] is not message:
            return False
        self._messages.pop()
        self._history_tokens -= self._token_counts.pop()
        self._appended -= 1
        return True

    def drop_oldest(self, *, target_ratio: float) -> int:
        """Drop the oldest whole turns until the usage ratio is at most ``target_ratio``.

        The newest turn is always kept, so the question being answered survives. Logs
        ``context_trimmed`` when something was dropped.

        Returns:
            The number of messages dropped.
        """
        ratio_before = self.estimate_usage_ratio()
        excess = self._fixed_tokens + self._history_tokens - int(target_ratio * self._window)
        count = oldest_turns_to_drop(
            [message["role"] for message in self._messages], self._token_counts, excess
        )
        if count:
            del self._messages[:count]
            self._history_tokens -= sum(self._token_counts[:count])
            del self._token_counts[:count]
            emit(
                logger,
                "context_trimmed",
                logging.WARNING,
                context=self.name,
                dropped_messages=count,
                ratio_before=ratio_before,
                ratio_after=self.estimate_usage_ratio(),
            )
        return count

    def extend_from(self, other: LLMContext, *, since: int) -> int:
        """Append the messages ``other`` received after its :attr:`appended` counter was ``since``.

        Token counts are reused when both contexts share a tokenizer, so this costs a list extend:
        it is what a handover adds to its turn.

        Returns:
            The number of messages appended.
        """
        count = min(max(other._appended - since, 0), len(other._messages))
        if not count:
            return 0
        messages = other._messages[-count:]
        if other._tokenizer is self._tokenizer:
            counts = other._token_counts[-count:]
        else:
            counts = [self._tokenizer.count_message(message) for message in messages]
        self._messages.extend(messages)
        self._token_counts.extend(counts)
        self._history_tokens += sum(counts)
        self._appended += count
        return count

    def tokens_since(self, since: int) -> int:
        """Tokens of the messages appended after :attr:`appended` was ``since`` (what a handover carries)."""
        count = min(max(self._appended - since, 0), len(self._messages))
        return sum(self._token_counts[-count:]) if count else 0

    def derive(self, *, history: Sequence[ConversationMessage], summary: str | None, name: str) -> LLMContext:
        """A new context with the same prompts, tokenizer and window, and the given contents."""
        return LLMContext(
            prompts=self._prompts,
            tokenizer=self._tokenizer,
            context_window_tokens=self._window,
            history=history,
            summary=summary,
            name=name,
        )

    @property
    def messages(self) -> tuple[ConversationMessage, ...]:
        """The history, oldest first (shared message dicts: do not mutate them)."""
        return tuple(self._messages)

    @property
    def last_message(self) -> ConversationMessage | None:
        """The newest message, if any."""
        return self._messages[-1] if self._messages else None

    @property
    def tokens(self) -> int:
        """Tokens :meth:`build_prompt` would send."""
        return self._fixed_tokens + self._history_tokens

    @property
    def appended(self) -> int:
        """Messages appended so far minus those removed by :meth:`remove_last` (not by trimming).

        A position in the conversation: messages appended after a snapshot taken at position ``p``
        are the last ``appended - p`` ones.
        """
        return self._appended

    @property
    def summary(self) -> str | None:
        """Summary of the conversation before this context's history, if it has one."""
        return self._summary

    @property
    def prompts(self) -> Prompts:
        """The prompt texts."""
        return self._prompts

    @property
    def context_window_tokens(self) -> int:
        """The window :meth:`estimate_usage_ratio` divides by."""
        return self._window

    @property
    def message_count(self) -> int:
        """Messages in the history."""
        return len(self._messages)

    def __repr__(self) -> str:
        return (
            f"LLMContext(name={self.name!r}, messages={len(self._messages)}, tokens={self.tokens},"
            f" ratio={self.estimate_usage_ratio():.3f}, summary={self._summary is not None})"
        )

    def _store(self, message: ConversationMessage) -> ConversationMessage:
        tokens = self._tokenizer.count_message(message)
        self._messages.append(message)
        self._token_counts.append(tokens)
        self._history_tokens += tokens
        self._appended += 1
        return message


def _checked(message: object) -> ConversationMessage:
    """A private, validated copy of ``message``."""
    if not isinstance(message, Mapping):
        raise ValueError(f"a message must be a dict with 'role' and 'content', got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise ValueError(f"message role and content must be str, got {role!r} and {type(content).__name__}")
    return make_message(role, content)
