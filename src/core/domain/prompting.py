"""Prompt assembly: the system prompt, an optional summary, the history and the answer-format instruction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Final

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.models import ConversationHistory, ConversationMessage

#: Introduces the summary of the earlier conversation inside the system message.
SUMMARY_HEADING: Final = "Краткое содержание предыдущей части разговора: "
#: How each role is labelled in the transcript a summary is made from.
TRANSCRIPT_LABELS: Final[Mapping[str, str]] = {
    "user": "Клиент",
    "assistant": "Ассистент",
    "system": "Система",
}


@dataclass(frozen=True, slots=True)
class Prompts:
    """The three prompt texts of a conversation (``prompts.yml``).

    Surrounding whitespace is stripped once here (YAML block scalars end with a newline), so assembling
    a prompt never has to.

    Attributes:
        system_prompt: Who the assistant is and how it speaks.
        response_format_instruction: How the structured answer must look; sent after the history.
        summarization_prompt: What a summary of the conversation must contain.

    Raises:
        DomainError: a text is not a string or is blank.
    """

    system_prompt: str
    response_format_instruction: str
    summarization_prompt: str

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if not isinstance(value, str) or not value.strip():
                raise DomainError(f"prompt {item.name!r} must be a non-empty string, got {value!r}")
            object.__setattr__(self, item.name, value.strip())

    @classmethod
    def from_mapping(cls, data: object) -> Prompts:
        """Build from a parsed ``prompts.yml`` (a mapping of exactly the three prompt names).

        Raises:
            DomainError: ``data`` is not a mapping, a prompt is missing or blank, or a key is unknown.
        """
        if not isinstance(data, Mapping):
            raise DomainError(f"prompts must be a mapping, got {type(data).__name__}")
        names = [item.name for item in fields(cls)]
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise DomainError(f"unknown prompt keys: {', '.join(unknown)} (expected {', '.join(names)})")
        missing = [name for name in names if name not in data]
        if missing:
            raise DomainError(f"missing prompt keys: {', '.join(missing)}")
        return cls(
            system_prompt=data["system_prompt"],
            response_format_instruction=data["response_format_instruction"],
            summarization_prompt=data["summarization_prompt"],
        )


def system_message(prompts: Prompts, summary: str | None = None) -> ConversationMessage:
    """The leading system message: the system prompt, plus the summary of the earlier conversation."""
    content = prompts.system_prompt
    if summary is not None and summary.strip():
        content = f"{content}\n\n{SUMMARY_HEADING}{summary.strip()}"
    return ConversationMessage(role="system", content=content)


def format_message(prompts: Prompts) -> ConversationMessage:
    """The trailing system message with the answer-format instruction."""
    return ConversationMessage(role="system", content=prompts.response_format_instruction)


def assemble_prompt(
    prompts: Prompts, history: Sequence[ConversationMessage], *, summary: str | None = None
) -> ConversationHistory:
    """The chat messages of one request: system message, history, format instruction.

    The format instruction comes last because models follow the most recent instruction best.

    Args:
        prompts: The prompt texts.
        history: The conversation so far (not copied: the message dicts are shared).
        summary: Summary of the conversation before ``history``; blank or ``None`` adds nothing.

    Returns:
        A new list of ``len(history) + 2`` messages.
    """
    messages: ConversationHistory = [system_message(prompts, summary)]
    messages.extend(history)
    messages.append(format_message(prompts))
    return messages


def transcript(history: Sequence[ConversationMessage], *, previous_summary: str | None = None) -> str:
    """The conversation as plain labelled lines (``Клиент: …``), preceded by an earlier summary if any.

    A summary is asked for over a transcript rather than the raw chat messages: given the messages
    themselves, a model tends to continue the conversation instead of describing it.
    """
    lines: list[str] = []
    if previous_summary is not None and previous_summary.strip():
        lines.append(f"{SUMMARY_HEADING}{previous_summary.strip()}")
        lines.append("")
    for message in history:
        label = TRANSCRIPT_LABELS.get(message["role"], message["role"])
        lines.append(f"{label}: {message['content']}")
    return "\n".join(lines)


def summary_request(
    prompts: Prompts, history: Sequence[ConversationMessage], *, previous_summary: str | None = None
) -> ConversationHistory:
    """The messages asking a model to summarize ``history`` (and the summary it continues, if any).

    Args:
        prompts: The prompt texts (``summarization_prompt`` is used).
        history: The messages to summarize.
        previous_summary: The summary the context holding ``history`` started from; it is folded
            into the new summary so that nothing said before it is forgotten.

    Returns:
        ``[system: summarization_prompt, user: transcript]``.
    """
    return [
        ConversationMessage(role="system", content=prompts.summarization_prompt),
        ConversationMessage(role="user", content=transcript(history, previous_summary=previous_summary)),
    ]
