"""Keeping secrets out of reprs, errors and logs: URL credentials masked, key-like strings scrubbed (pure)."""

from __future__ import annotations

import re
from typing import Final

#: What a hidden secret is shown as.
MASK: Final = "***"
#: Longest provider body (error text) quoted in an error or a log line.
MAX_QUOTED_CHARS: Final = 200

# scheme://user:password@host -> scheme://user:***@host (also a bare password: scheme://:pw@host).
_URL_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/?#@\s]*):(?P<pw>[^@/?#\s]*)@"
)
# scheme://token@host (userinfo without a colon is a credential for many services)
_URL_USER_ONLY = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^:/?#@\s]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&;](?:password|passwd|pwd|api[_-]?key|key|token|access_token|secret|auth)=)[^&#\s]*",
    re.IGNORECASE,
)
_KEY_LIKE = re.compile(
    r"""
    (?P<bearer>\b(?:Bearer|Basic|Token)\s+)[A-Za-z0-9._~+/=\-]{8,}       # Authorization values
    | \b(?:sk|pk|rk|ak)-[A-Za-z0-9_\-]{8,}                               # sk-..., sk-proj-...
    | \b(?:ghp|gho|ghs|github_pat|xox[abpr]|AKIA)[A-Za-z0-9_\-]{8,}       # well-known token shapes
    | (?P<field>["']?(?:api[_-]?key|apikey|access[_-]?token|secret|password|passwd|token|authorization)
        ["']?\s*[:=]\s*["']?)(?:(?:Bearer|Basic|Token)\s+)?[^"'\s,;}]{4,}  # key=value, "key": "value"
    | \b[A-Za-z0-9_\-]{40,}\b                                             # long opaque tokens
    """,
    re.IGNORECASE | re.VERBOSE,
)


def mask_url(url: str) -> str:
    """``url`` with the password of its user info and secret query parameters replaced by ``***``."""
    masked = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", url)
    masked = _URL_USER_ONLY.sub(lambda m: f"{m['scheme']}{MASK}@", masked)
    return _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", masked)


def scrub_secrets(text: str) -> str:
    """``text`` with URL credentials and key-like strings (API keys, bearer tokens...) replaced by ``***``."""
    scrubbed = mask_url(text)

    def hide(match: re.Match[str]) -> str:
        keep = match["bearer"] or match["field"] or ""
        return keep + MASK

    return _KEY_LIKE.sub(hide, scrubbed)


def quote_body(text: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """A provider's response body fit to quote in an error or a log: scrubbed, one line, truncated."""
    flat = " ".join(text.split())
    if len(flat) > limit * 4:
        flat = flat[: limit * 4]  # scrub a bounded amount
    flat = scrub_secrets(flat)
    if len(flat) > limit:
        return f"{flat[:limit]}... ({len(text)} chars)"
    return flat
