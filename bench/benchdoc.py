"""Shared by the bench scripts: put one ``## <heading>`` section into docs/benchmarks.md."""

from __future__ import annotations

import platform
import re
from datetime import UTC, datetime

#: Everything below this line of docs/benchmarks.md belongs to the per-area sections;
#: bench_cache.py rewrites only what is above it.
MARKER = "<!-- more benchmarks below -->"


def merge_section(existing: str, section: str, heading: str) -> str:
    """``existing`` with its ``heading`` section replaced by ``section`` (or appended).

    Only the text from the heading up to the next ``## `` heading (or the end) is replaced. A new
    section goes below :data:`MARKER` (added when missing).
    """
    found = re.search(rf"^{re.escape(heading)}[ \t]*$", existing, re.MULTILINE)
    if found:
        following = re.compile(r"^## ", re.MULTILINE).search(existing, found.end())
        if following is None:
            return existing[: found.start()] + section
        return existing[: found.start()] + section + "\n" + existing[following.start() :]
    if not existing.strip():
        return f"{MARKER}\n\n{section}"
    head = existing.rstrip("\n")
    if MARKER not in existing:
        head += f"\n\n{MARKER}"
    return f"{head}\n\n{section}"


def run_context() -> list[str]:
    """The date and machine lines every benchmark section starts with."""
    return [
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {platform.machine()}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
    ]
