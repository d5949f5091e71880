"""Text that can always be encoded: lone surrogates repaired with U+FFFD (pure)."""

from __future__ import annotations

from typing import Final

#: What an unpaired surrogate is replaced with.
REPLACEMENT_CHARACTER: Final = "\ufffd"


def repair_text(text: str) -> tuple[str, int]:
    """``text`` made encodable as UTF-8, and how many code points were replaced.

    A ``str`` may hold lone surrogates (``"\\ud83d"``: half an emoji cut by a tokenizer, a bad
    ``surrogateescape`` decode); UTF-8 cannot encode them, so anything that sends or stores the text
    would raise ``UnicodeEncodeError``. Each unpaired surrogate becomes U+FFFD; a *pair* of surrogate
    code points (a UTF-16 pair split into two characters) is joined into the character it encodes.
    Valid text is returned as is, at the cost of one ``isascii``/``encode`` check.
    """
    if text.isascii():
        return text, 0
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return text, 0
    # UTF-16 with surrogatepass keeps every code point; decoding it back joins valid pairs and turns
    # each unpaired surrogate into U+FFFD.
    repaired = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    replaced = repaired.count(REPLACEMENT_CHARACTER) - text.count(REPLACEMENT_CHARACTER)
    return repaired, max(replaced, 0)


def encodable(text: str) -> bool:
    """True when ``text`` can be encoded as UTF-8 (no unpaired surrogates)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
