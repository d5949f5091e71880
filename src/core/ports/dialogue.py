"""The dialogue cache port: a session's messages and context mark, kept for weeks, restored on resume."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from voxcore.core.domain.dialogue import ContextMark, DialogueSnapshot, StoredMessage


class DialogueStore(ABC):
    """Where completed turns of every session are kept, so a call can resume on another worker.

    Implementations refresh the session's time to live on every write, keep at most a configured
    number of the newest messages, and store the context mark beside them.
    """

    @abstractmethod
    async def append(
        self,
        session_id: str,
        messages: Sequence[StoredMessage],
        mark: ContextMark,
        *,
        replace: bool = False,
    ) -> None:
        """Append ``messages`` (oldest first) and set the context mark, atomically.

        Args:
            session_id: The call's id.
            messages: New messages, continuing the stored ``seq`` run.
            mark: Where the active context stands after these messages.
            replace: Drop what the store held for the session first (a fresh conversation).

        Raises:
            BackendError: the store failed; nothing was written.
        """

    @abstractmethod
    async def load(self, session_id: str) -> DialogueSnapshot | None:
        """The session's stored dialogue, or ``None`` when there is none (never stored, or expired).

        Raises:
            CorruptDialogueError: a record is corrupt or of another format version.
            BackendError: the store failed.
        """

    @abstractmethod
    async def delete(self, session_id: str) -> None:
        """Forget the session's dialogue.

        Raises:
            BackendError: the store failed.
        """
