"""Russian speech for hybrid replies: numbers, money, dates and times as words and as playlists of
recorded word fragments (the number fragment pack), plus plural forms and inflected unit fragments.

The words come from :mod:`voxcore.core.domain.russian_words` (re-exported here). The playlist
builders :func:`say_number`, :func:`say_money`, :func:`say_date` and :func:`say_time` speak the same
words from recorded fragments, one per word, as telephony IVRs do (Asterisk's ``SayNumber``,
FreeSWITCH ``mod_say_ru``): with the pack in the cache a reply such as "Ваша стоимость составляет
12 500 рублей" needs no synthesis at all. A fragment missing from the cache is spoken from its
manifest transcript by the responder, so a pack that is not loaded degrades to TTS per word.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Final

from voxcore.core.domain.errors import DomainError
from voxcore.core.domain.keys import static_key
from voxcore.core.domain.playlist import Playlist, StaticItem
from voxcore.core.domain.russian_words import (
    HOUR,
    KOPECK,
    MINUTE,
    MONTHS_GENITIVE,
    NUMBER_LIMIT,
    PERCENT,
    RUBLE,
    Gender,
    VerbalizationError,
    counted_words,
    date_words,
    decimal_words,
    digit_group_words,
    money_words,
    number_words,
    phone_words,
    plural_form,
    time_words,
    year_ordinal,
)
from voxcore.core.domain.tts_text import normalize_tts_text

__all__ = [
    "HOUR",
    "KOPECK",
    "MINUTE",
    "MONTHS_GENITIVE",
    "NUMBER_LIMIT",
    "NUMBER_PACK",
    "PERCENT",
    "PLURAL_SUFFIXES",
    "RUBLE",
    "Gender",
    "MissingWordFragmentError",
    "VerbalizationError",
    "counted_words",
    "date_words",
    "decimal_words",
    "digit_group_words",
    "format_amount",
    "hybrid_amount_playlist",
    "money_words",
    "number_words",
    "phone_words",
    "plural_form",
    "say_date",
    "say_money",
    "say_number",
    "say_time",
    "say_words",
    "time_words",
    "unit_fragment_key",
    "word_fragment_key",
    "year_ordinal",
]

#: Suffixes of the three recorded forms of a unit (see :func:`unit_fragment_key`).
PLURAL_SUFFIXES = ("_one", "_few", "_many")

_CARDINALS: Final = (
    ("ноль", "num_0"),
    ("один", "num_1"),
    ("одна", "num_1_f"),
    ("одно", "num_1_n"),
    ("два", "num_2"),
    ("две", "num_2_f"),
    ("три", "num_3"),
    ("четыре", "num_4"),
    ("пять", "num_5"),
    ("шесть", "num_6"),
    ("семь", "num_7"),
    ("восемь", "num_8"),
    ("девять", "num_9"),
    ("десять", "num_10"),
    ("одиннадцать", "num_11"),
    ("двенадцать", "num_12"),
    ("тринадцать", "num_13"),
    ("четырнадцать", "num_14"),
    ("пятнадцать", "num_15"),
    ("шестнадцать", "num_16"),
    ("семнадцать", "num_17"),
    ("восемнадцать", "num_18"),
    ("девятнадцать", "num_19"),
    ("двадцать", "num_20"),
    ("тридцать", "num_30"),
    ("сорок", "num_40"),
    ("пятьдесят", "num_50"),
    ("шестьдесят", "num_60"),
    ("семьдесят", "num_70"),
    ("восемьдесят", "num_80"),
    ("девяносто", "num_90"),
    ("сто", "num_100"),
    ("двести", "num_200"),
    ("триста", "num_300"),
    ("четыреста", "num_400"),
    ("пятьсот", "num_500"),
    ("шестьсот", "num_600"),
    ("семьсот", "num_700"),
    ("восемьсот", "num_800"),
    ("девятьсот", "num_900"),
    ("минус", "num_minus"),
)
_ORDINALS_NEUTER: Final = (  # day of the month: "первое декабря"
    "первое",
    "второе",
    "третье",
    "четвёртое",
    "пятое",
    "шестое",
    "седьмое",
    "восьмое",
    "девятое",
    "десятое",
    "одиннадцатое",
    "двенадцатое",
    "тринадцатое",
    "четырнадцатое",
    "пятнадцатое",
    "шестнадцатое",
    "семнадцатое",
    "восемнадцатое",
    "девятнадцатое",
)
_ORDINALS_GENITIVE: Final = (  # the last word of a year: "две тысячи двадцать шестого года"
    "первого",
    "второго",
    "третьего",
    "четвёртого",
    "пятого",
    "шестого",
    "седьмого",
    "восьмого",
    "девятого",
    "десятого",
    "одиннадцатого",
    "двенадцатого",
    "тринадцатого",
    "четырнадцатого",
    "пятнадцатого",
    "шестнадцатого",
    "семнадцатого",
    "восемнадцатого",
    "девятнадцатого",
)
_TENS_ORDINALS_GENITIVE: Final = (
    "двадцатого",
    "тридцатого",
    "сорокового",
    "пятидесятого",
    "шестидесятого",
    "семидесятого",
    "восьмидесятого",
    "девяностого",
)
_HUNDREDS_ORDINALS_GENITIVE: Final = (
    "сотого",
    "двухсотого",
    "трёхсотого",
    "четырёхсотого",
    "пятисотого",
    "шестисотого",
    "семисотого",
    "восьмисотого",
    "девятисотого",
)
_THOUSANDS_ORDINALS_GENITIVE: Final = (
    "тысячного",
    "двухтысячного",
    "трёхтысячного",
    "четырёхтысячного",
    "пятитысячного",
    "шеститысячного",
    "семитысячного",
    "восьмитысячного",
    "девятитысячного",
)


def _pack() -> dict[str, str]:
    pack = dict(_CARDINALS)
    for base, forms in (
        ("num_thousand", ("тысяча", "тысячи", "тысяч")),
        ("num_million", ("миллион", "миллиона", "миллионов")),
        ("num_billion", ("миллиард", "миллиарда", "миллиардов")),
        ("currency_rub", RUBLE),
        ("currency_kop", KOPECK),
        ("time_hour", HOUR),
        ("time_minute", MINUTE),
    ):
        for suffix, word in zip(PLURAL_SUFFIXES, forms, strict=True):
            pack[word] = base + suffix
    pack["ровно"] = "time_exactly"
    for day, word in enumerate(_ORDINALS_NEUTER, 1):
        pack[word] = f"ord_n_{day}"
    pack["двадцатое"] = "ord_n_20"
    pack["тридцатое"] = "ord_n_30"
    for n, word in enumerate(_ORDINALS_GENITIVE, 1):
        pack[word] = f"ord_g_{n}"
    for n, word in enumerate(_TENS_ORDINALS_GENITIVE, 2):
        pack[word] = f"ord_g_{n * 10}"
    for n, word in enumerate(_HUNDREDS_ORDINALS_GENITIVE, 1):
        pack[word] = f"ord_g_{n * 100}"
    for n, word in enumerate(_THOUSANDS_ORDINALS_GENITIVE, 1):
        pack[word] = f"ord_g_{n * 1000}"
    for month, word in enumerate(MONTHS_GENITIVE, 1):
        pack[word] = f"date_month_{month:02d}"
    pack["года"] = "date_year_gen"
    return pack


#: The number fragment pack: word -> fragment name (its key is ``static:<name>``). Every word that
#: :func:`say_number`, :func:`say_money`, :func:`say_date` or :func:`say_time` can say is here;
#: the shipped ``manifest_numbers.yml`` records each one with the word as its transcript.
NUMBER_PACK: Mapping[str, str] = MappingProxyType(_pack())
_KEYS: Final = {word: static_key(name) for word, name in NUMBER_PACK.items()}


class MissingWordFragmentError(DomainError):
    """A word has no fragment in the number pack."""


def word_fragment_key(word: str) -> str:
    """The ``static:*`` key of one word of the number pack ("пятьсот" -> ``static:num_500``).

    Raises:
        MissingWordFragmentError: the pack has no fragment for the word.
    """
    key = _KEYS.get(word)
    if key is None:
        raise MissingWordFragmentError(f"no fragment in the number pack for {word!r}")
    return key


def say_words(words: str | Iterable[str]) -> Playlist:
    """A playlist of one pack fragment per word (a string is split on spaces).

    Raises:
        MissingWordFragmentError: a word is not in the pack.
        PlaylistError: no words.
    """
    parts = words.split() if isinstance(words, str) else list(words)
    return Playlist(tuple(StaticItem(word_fragment_key(word)) for word in parts))


def say_number(n: int, gender: Gender = "m") -> Playlist:
    """``n`` spoken from the pack: :func:`number_words` as one fragment per word."""
    return say_words(number_words(n, gender))


def say_money(rubles: int, kopecks: int = 0) -> Playlist:
    """An amount spoken from the pack: :func:`money_words` ("двенадцать тысяч пятьсот рублей")."""
    return say_words(money_words(rubles, kopecks))


def say_date(d: dt.date) -> Playlist:
    """A date spoken from the pack: :func:`date_words` ("первое декабря ... года")."""
    return say_words(date_words(d))


def say_time(t: dt.time) -> Playlist:
    """A time of day spoken from the pack: :func:`time_words` ("четырнадцать часов пять минут")."""
    return say_words(time_words(t))


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
    """An integer amount as the text a TTS engine is given: its words ("двенадцать тысяч пятьсот")."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int, got {type(amount).__name__}")
    return normalize_tts_text(str(amount))


def hybrid_amount_playlist(
    amount: int, intro_key: str = "static:intro", unit_base: str = "currency_rub"
) -> Playlist:
    """The playlist "<intro> <amount> <unit>", all from recorded fragments.

    With the defaults, 12500 gives ``static:intro`` ("Ваша стоимость составляет") followed by
    :func:`say_money` of 12500: "двенадцать" "тысяч" "пятьсот" "рублей", one pack fragment per word.
    Another ``unit_base`` (a unit recorded as ``<base>_one/_few/_many``, counted in the masculine)
    gives :func:`say_number` followed by the unit fragment that agrees with ``amount``.

    Args:
        amount: The integer to speak.
        intro_key: The recorded lead-in (a ``static:*`` key).
        unit_base: The unit's fragment name (see :func:`unit_fragment_key`).

    Raises:
        TypeError: ``amount`` is not an int.
        DomainError: a key is invalid or the amount is out of range (``VerbalizationError``).
    """
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int, got {type(amount).__name__}")
    if unit_base == "currency_rub":
        body = say_money(amount).items
    else:
        body = (*say_number(amount).items, StaticItem(unit_fragment_key(amount, unit_base)))
    return Playlist((StaticItem(intro_key), *body))
