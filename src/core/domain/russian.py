"""Russian grammar building blocks for hybrid replies: plural forms and inflected unit fragments."""

from __future__ import annotations

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.keys import static_key
from voxcore.core.domain.playlist import Playlist, StaticItem, TTSItem
from voxcore.core.domain.tts_text import normalize_tts_text

#: Suffixes of the three recorded forms of a unit (see :func:`unit_fragment_key`).
PLURAL_SUFFIXES = ("_one", "_few", "_many")


def plural_form(n: int, one: str, few: str, many: str) -> str:
    """Pick the Russian plural form that agrees with the integer ``n``.

    * ``one`` when the last digit is 1 but the last two are not 11: 1, 21, 101, 1001 (рубль);
    * ``few`` when the last digit is 2-4 but the last two are not 12-14: 2, 3, 24, 102 (рубля);
    * ``many`` otherwise: 0, 5-20, 11-14, 25-30, 111-114 (рублей).

    Negative numbers agree like their absolute value ("минус один рубль").

    Raises:
        TypeError: ``n`` is not an int (fractions take the genitive singular: a rule of its own).
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"plural_form needs an int, got {type(n).__name__}")
    n = abs(n)
    last, last_two = n % 10, n % 100
    if last == 1 and last_two != 11:
        return one
    if 2 <= last <= 4 and not 12 <= last_two <= 14:
        return few
    return many


def unit_fragment_key(n: int, base: str = "currency_rub") -> str:
    """The ``static:*`` key of the unit word that agrees with ``n``.

    Naming convention: every countable unit is recorded three times, once per plural form, as
    fragments ``static:<base>_one``, ``static:<base>_few`` and ``static:<base>_many``. For
    ``base="currency_rub"`` these say "рубль", "рубля" and "рублей"; ``unit_fragment_key(12500)``
    is ``static:currency_rub_many``. The manifest must hold all three for every unit used.

    Args:
        n: The count the unit follows.
        base: The unit's fragment name without ``static:`` and without a suffix.

    Raises:
        TypeError: ``n`` is not an int.
        DomainError: ``base`` is empty, or is given with its ``static:`` prefix.
    """
    if not isinstance(base, str) or not base:
        raise DomainError(f"unit base must be a non-empty fragment name, got {base!r}")
    if base.startswith("static:"):
        raise DomainError(f"unit base is a bare fragment name (no 'static:'), got {base!r}")
    return static_key(base + plural_form(n, *PLURAL_SUFFIXES))


def format_amount(amount: int) -> str:
    """An integer amount as text for TTS, in the canonical grouping ("12 500", "9999", "-1 000 000")."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int, got {type(amount).__name__}")
    return normalize_tts_text(str(amount))


def hybrid_amount_playlist(
    amount: int, intro_key: str = "static:intro", unit_base: str = "currency_rub"
) -> Playlist:
    """The playlist "<intro> <amount> <unit>" with the unit inflected for ``amount``.

    With the defaults, 12500 gives ``static:intro`` ("Ваша стоимость составляет"), the synthesized
    text "12 500", and ``static:currency_rub_many`` ("рублей"); 1 ends on ``..._one`` ("рубль"),
    2 on ``..._few`` ("рубля").

    Args:
        amount: The integer to speak.
        intro_key: The recorded lead-in (a ``static:*`` key).
        unit_base: The unit's fragment name (see :func:`unit_fragment_key`).

    Raises:
        TypeError: ``amount`` is not an int.
        DomainError: a key is invalid (``PlaylistError`` for the intro, ``DomainError`` for the unit).
    """
    return Playlist.of(
        StaticItem(intro_key),
        TTSItem(format_amount(amount)),
        StaticItem(unit_fragment_key(amount, unit_base)),
    )
