"""Russian numbers, money, dates, times and phone numbers as words (pure: values in, text out).

Cardinal and ordinal words come from num2words' Russian module (``num2words.lang_RU``), which is
right for every case of the grammar table in ``tests/unit/test_russian_words.py``: gender of
one/two ("один/одна/одно", "два/две"), "одна тысяча"/"две тысячи"/"пять тысяч", миллион/миллиона/
миллионов, ordinals in the nominative neuter ("первое") and genitive ("двадцать шестого",
"двухтысячного"). What is written here by hand, and why:

* the composition of a number from its three-digit groups: num2words' own path for a whole number
  costs ~50 µs (it goes through ``Decimal`` and a generic splitter); a group costs ~30 µs once and
  there are only 3 x 1000 of them, so they are memoized and a number costs a few µs;
* money: ``num2words(..., to="currency", currency="RUB")`` puts a comma between rubles and kopecks
  and always says "ноль копеек" ("двенадцать тысяч пятьсот рублей, ноль копеек"), which no phone
  bot says;
* dates, times and phone numbers: num2words has no Russian forms for them.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from typing import Final, Literal, TypeAlias

from num2words.lang_RU import Num2Word_RU

from voxcore.core.domain.errors import DomainError

Gender: TypeAlias = Literal["m", "f", "n"]

#: Numbers :func:`number_words` speaks: ``abs(n) < NUMBER_LIMIT`` (up to the billions).
NUMBER_LIMIT: Final = 10**12
_GENDERS: Final = ("m", "f", "n")
_N2W: Final = Num2Word_RU()

# Scale words, by plural form (one, few, many); the grammatical gender of the count before them.
_THOUSAND: Final = ("тысяча", "тысячи", "тысяч")
_MILLION: Final = ("миллион", "миллиона", "миллионов")
_BILLION: Final = ("миллиард", "миллиарда", "миллиардов")
_SCALES: Final = ((10**9, _BILLION, "m"), (10**6, _MILLION, "m"), (10**3, _THOUSAND, "f"))

RUBLE: Final = ("рубль", "рубля", "рублей")
KOPECK: Final = ("копейка", "копейки", "копеек")
HOUR: Final = ("час", "часа", "часов")
MINUTE: Final = ("минута", "минуты", "минут")
PERCENT: Final = ("процент", "процента", "процентов")
#: The month names in the genitive ("первое декабря"), January first.
MONTHS_GENITIVE: Final = (
    "января",
    "февраля",
    "марта",
    "апреля",
    "мая",
    "июня",
    "июля",
    "августа",
    "сентября",
    "октября",
    "ноября",
    "декабря",
)
MINUS: Final = "минус"
PLUS: Final = "плюс"
ZERO: Final = "ноль"
YEAR_GENITIVE: Final = "года"
#: What :func:`time_words` says for a whole hour ("четырнадцать часов ровно").
EXACTLY: Final = "ровно"


class VerbalizationError(DomainError):
    """A value that cannot be spoken (out of range, wrong type, unknown gender)."""


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


def _check_int(n: object, what: str) -> int:
    if isinstance(n, bool) or not isinstance(n, int):
        raise VerbalizationError(f"{what} must be an int, got {type(n).__name__}")
    return n


@functools.lru_cache(maxsize=3 * 1000)  # the whole domain: 0..999 in three genders
def _group(n: int, gender: Gender) -> str:
    return str(_N2W.to_cardinal(n, gender=gender))


def number_words(n: int, gender: Gender = "m") -> str:
    """The cardinal number ``n`` in Russian words, agreeing with a noun of ``gender``.

    ``number_words(21001) == "двадцать одна тысяча один"``, ``number_words(2, "f") == "две"``,
    ``number_words(1, "n") == "одно"``, ``number_words(-5) == "минус пять"``; "одна тысяча",
    "две тысячи", "пять тысяч", "один миллион", "два миллиарда".

    Args:
        n: An integer with ``abs(n) < 10**12``.
        gender: ``"m"``, ``"f"`` or ``"n"``: the gender of the counted noun (it changes the last
            "один/одна/одно" and "два/две").

    Raises:
        VerbalizationError: ``n`` is not an int or is out of range, or the gender is unknown.
    """
    _check_int(n, "number")
    if gender not in _GENDERS:
        raise VerbalizationError(f"gender must be one of {_GENDERS}, got {gender!r}")
    if not -NUMBER_LIMIT < n < NUMBER_LIMIT:
        raise VerbalizationError(f"number out of range (|n| < 10**12): {n}")
    if n == 0:
        return ZERO
    words: list[str] = [MINUS] if n < 0 else []
    rest = abs(n)
    for scale, forms, scale_gender in _SCALES:
        count, rest = divmod(rest, scale)
        if count:
            words.append(_group(count, scale_gender))
            words.append(plural_form(count, *forms))
    if rest:
        words.append(_group(rest, gender))
    return " ".join(words)


def counted_words(n: int, forms: tuple[str, str, str], gender: Gender = "m") -> str:
    """``n`` followed by the noun form that agrees with it: ``(5, MINUTE, "f")`` -> "пять минут"."""
    return f"{number_words(n, gender)} {plural_form(n, *forms)}"


def money_words(rubles: int, kopecks: int = 0) -> str:
    """An amount of money in words: "двенадцать тысяч пятьсот рублей", "сто один рубль одна копейка".

    Kopecks are said only when there are any ("три рубля двадцать две копейки"); an amount under a
    ruble is said in kopecks alone ("пятьдесят копеек"); nothing at all is "ноль рублей".

    Args:
        rubles: Whole rubles (negative for a debt: "минус пять рублей").
        kopecks: 0..99.

    Raises:
        VerbalizationError: wrong types or ranges.
    """
    _check_int(rubles, "rubles")
    _check_int(kopecks, "kopecks")
    if not 0 <= kopecks <= 99:
        raise VerbalizationError(f"kopecks must be 0..99, got {kopecks}")
    if rubles == 0 and kopecks:
        return counted_words(kopecks, KOPECK, "f")
    text = counted_words(rubles, RUBLE, "m")
    if kopecks:
        text += " " + counted_words(kopecks, KOPECK, "f")
    return text


@functools.lru_cache(maxsize=64)
def _day_ordinal(day: int) -> str:
    return str(_N2W.to_ordinal(day, gender="n"))  # "первое", "двадцать первое"


def date_words(d: dt.date) -> str:
    """A date as said in Russian: "первое декабря две тысячи двадцать шестого года".

    The day is an ordinal in the nominative neuter, the month a genitive, the year an ordinal in
    the genitive followed by "года". (Prepositions govern other cases - "до первого декабря" -
    which a caller must build from the parts: this is the form for a date said on its own.)

    Raises:
        VerbalizationError: ``d`` is not a date.
    """
    if not isinstance(d, dt.date):
        raise VerbalizationError(f"date_words needs a datetime.date, got {type(d).__name__}")
    return (
        f"{_day_ordinal(d.day)} {MONTHS_GENITIVE[d.month - 1]} "
        f"{year_ordinal(d.year, 'genitive')} {YEAR_GENITIVE}"
    )


def time_words(t: dt.time) -> str:
    """A time of day as a talking clock says it: "четырнадцать часов пять минут".

    "один час одна минута" (minutes are feminine); a whole hour is "четырнадцать часов ровно";
    seconds are not said.

    Raises:
        VerbalizationError: ``t`` is not a time.
    """
    if not isinstance(t, dt.time):
        raise VerbalizationError(f"time_words needs a datetime.time, got {type(t).__name__}")
    hours = counted_words(t.hour, HOUR, "m")
    if t.minute == 0:
        return f"{hours} {EXACTLY}"
    return f"{hours} {counted_words(t.minute, MINUTE, 'f')}"


def digit_group_words(digits: str) -> str:
    """A group of digits as said in a phone number: leading zeros one by one, then the number.

    "800" -> "восемьсот", "05" -> "ноль пять", "00" -> "ноль ноль", "012" -> "ноль двенадцать".

    Raises:
        VerbalizationError: not a non-empty string of ASCII digits.
    """
    if not isinstance(digits, str) or not digits.isascii() or not digits.isdigit():
        raise VerbalizationError(f"a digit group must be ASCII digits, got {digits!r}")
    stripped = digits.lstrip("0")
    words = [ZERO] * (len(digits) - len(stripped))
    if stripped:
        words.append(number_words(int(stripped)))
    return " ".join(words)


_PHONE_SEPARATORS: Final = re.compile(r"[\s()\-]+")


def _phone_groups(digits: str) -> list[str]:
    # How a run of digits in a phone number is said: never as thousands or millions. A run of 10
    # or 11 digits is a whole number, (country) 3-3-2-2; a longer group than three digits is said
    # in pairs, led by a triple when its length is odd: "3535" -> 35 35 (a city code "3452" ->
    # 34 52), "34342" -> 343 42, "5553535" -> 555 35 35, "123456" -> 12 34 56.
    if len(digits) <= 3:
        return [digits]
    if len(digits) in (10, 11):
        head = [digits[:-10]] if len(digits) == 11 else []
        body = digits[-10:]
        return [*head, body[:3], body[3:6], body[6:8], body[8:]]
    lead = 3 if len(digits) % 2 else 0
    return [*([digits[:lead]] if lead else []), *(digits[i : i + 2] for i in range(lead, len(digits), 2))]


def phone_words(phone: str) -> str:
    """A Russian phone number as said aloud, group by group.

    "8 800 555-35-35" -> "восемь восемьсот пятьсот пятьдесят пять тридцать пять тридцать пять";
    "+7 (495) 012-34-05" -> "плюс семь четыреста девяносто пять ноль двенадцать тридцать четыре
    ноль пять". The groups are those written, each said as a number with its leading zeros one by
    one; a phone number is never said in thousands, so a written group of more than three digits
    is split as in Russia: an unformatted run of 10 or 11 digits as (country) 3-3-2-2, any other
    in pairs led by a triple when odd ("555-3535" -> 555 35 35, a city code "(3452)" -> 34 52).

    Raises:
        VerbalizationError: no digits, or characters other than digits, spaces, ``+ ( ) -``.
    """
    if not isinstance(phone, str):
        raise VerbalizationError(f"phone must be str, got {type(phone).__name__}")
    text = phone.strip()
    words: list[str] = []
    if text.startswith("+"):
        words.append(PLUS)
        text = text[1:]
    groups = [g for g in _PHONE_SEPARATORS.split(text) if g]
    if not groups or not all(g.isascii() and g.isdigit() for g in groups):
        raise VerbalizationError(f"not a phone number: {phone!r}")
    words.extend(digit_group_words(part) for g in groups for part in _phone_groups(g))
    return " ".join(words)


_FRACTION_NAMES: Final = (
    ("десятая", "десятых"),
    ("сотая", "сотых"),
    ("тысячная", "тысячных"),
)


def decimal_words(integer: int, fraction: str) -> str:
    """A decimal fraction as said in Russian: (12, "5") -> "двенадцать целых пять десятых".

    "одна целая", "две целых"; the fraction is a count of tenths, hundredths or thousandths
    (feminine: "одна десятая", "двадцать пять сотых"). A negative ``integer`` says "минус".

    Args:
        integer: The whole part.
        fraction: 1..3 ASCII digits after the decimal comma, as written ("05" is five hundredths).

    Raises:
        VerbalizationError: wrong types or ranges.
    """
    _check_int(integer, "integer part")
    if not isinstance(fraction, str) or not 1 <= len(fraction) <= 3 or not fraction.isascii():
        raise VerbalizationError(f"fraction must be 1..3 digits, got {fraction!r}")
    if not fraction.isdigit():
        raise VerbalizationError(f"fraction must be 1..3 digits, got {fraction!r}")
    whole = number_words(integer, "f")
    whole_noun = "целая" if plural_form(integer, "one", "few", "many") == "one" else "целых"
    numerator = int(fraction)
    singular, plural = _FRACTION_NAMES[len(fraction) - 1]
    noun = singular if plural_form(numerator, "one", "few", "many") == "one" else plural
    return f"{whole} {whole_noun} {number_words(numerator, 'f')} {noun}"


@functools.lru_cache(maxsize=4096)
def year_ordinal(year: int, case: str) -> str:
    """A year as an ordinal in ``case`` ("nominative", "genitive", "prepositional"...).

    (2026, "prepositional") -> "две тысячи двадцать шестом" ("в 2026 году").

    Raises:
        VerbalizationError: not an int in 1..9999 or an unknown case.
    """
    _check_int(year, "year")
    if not 1 <= year <= 9999:
        raise VerbalizationError(f"year must be 1..9999, got {year}")
    if case not in ("nominative", "genitive", "dative", "accusative", "instrumental", "prepositional"):
        raise VerbalizationError(f"unknown case {case!r}")
    return str(_N2W.to_ordinal(year, case=case))
