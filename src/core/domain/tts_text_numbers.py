"""Numbers in text for speech, as Russian words: phones, dates, times, money, percents, plain numbers.

Used by :func:`~voxcore.core.domain.tts_text.normalize_tts_text` on text whose whitespace is already
collapsed to single spaces. Only forms that are read one way are rewritten; anything else with
digits (a number glued to letters such as "A12", an ordinal with a suffix such as "1-го", a
version "1.2.3") is left as written.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Final

from voxcore.core.domain.russian_words import (
    MINUS,
    PERCENT,
    Gender,
    VerbalizationError,
    counted_words,
    date_words,
    decimal_words,
    digit_group_words,
    money_words,
    number_words,
    phone_words,
    time_words,
    year_ordinal,
)

__all__ = ["verbalize"]

# An integer as written: digit groups of three after a first group without a leading zero
# ("12 500", "1 000 000"), or one run of digits ("12500", "007").
_INT = r"(?:[1-9][0-9]{0,2}(?: [0-9]{3})+|[0-9]+)"
_PATTERN: Final = re.compile(
    # 8 800 555-35-35, 8-800-555-35-35, +7 (495) 123-45-67, +7-999-123-45-67, +79991234567, and a
    # city code of 4 or 5 digits in brackets: +7 (3452) 12-34-56, 8 (34342) 1-23-45
    r"(?<![\w+])(?P<phone>(?:\+7|8)[ -]?"
    r"(?:(?:\([0-9]{3}\)|[0-9]{3})[ -]?[0-9]{3}|\([0-9]{4}\)[ -]?[0-9]{2}|\([0-9]{5}\)[ -]?[0-9])"
    r"[ -]?[0-9]{2}[ -]?[0-9]{2})"
    r"(?![\w]|-[0-9])"
    # 01.12.2026
    r"|(?<![\w.])(?P<date>(?P<dd>[0-9]{1,2})\.(?P<mm>[0-9]{1,2})\.(?P<yyyy>[0-9]{4}))(?![\w]|\.[0-9])"
    # 14:05 (not 14:05:30)
    r"|(?<![\w:])(?P<time>(?P<hh>[01]?[0-9]|2[0-3]):(?P<mi>[0-5][0-9]))(?![\w]|:[0-9])"
    # 12 500 ₽, 12 500,50 руб, 3 рубля 20 копеек
    r"|(?<!\w)(?P<money>(?P<m_minus>-)?(?P<rub>" + _INT + r")(?:,(?P<m_frac>[0-9]{2}))? ?"
    r"(?:₽|руб(?:л[а-яё]*)?)(?![а-яё\w])(?: (?P<kop>[0-9]{1,2}) ?коп(?:е[а-яё]*)?(?![а-яё\w]))?)"
    # 15%, 2,5 %
    r"|(?<![\w,.])(?P<pct>(?P<p_int>" + _INT + r")(?:,(?P<p_frac>[0-9]{1,3}))?) ?%"
    # в 2026 году
    r"|(?<![\w.,:])(?P<year>[0-9]{4}) (?P<year_word>год|года|году|годом)(?![а-яё\w])"
    # 12,5
    r"|(?<![\w.,:])(?P<dec>(?P<d_minus>(?<![\w-])-)?(?P<d_int>[0-9]+),(?P<d_frac>[0-9]{1,3}))"
    r"(?![\w]|[.,:][0-9])"
    # 12500, 12 500, -5, 007
    r"|(?<![\w.,:])(?P<int>(?P<i_minus>(?<![\w-])-)?(?P<num>" + _INT + r"))(?![\w]|[.,:][0-9]|-[^\W\d_])",
)
_NEXT_WORD: Final = re.compile(r" ([а-яё]+)", re.IGNORECASE)
_YEAR_CASES: Final = {
    "год": "nominative",
    "года": "genitive",
    "году": "prepositional",
    "годом": "instrumental",
}
# Nouns counted in the feminine ("одна минута", "две недели") or the neuter ("одно место"): the
# stems of the common ones after a number in a phone bot's replies. Anything else is masculine.
_FEMININE_STEMS: Final = (
    "минут",
    "секунд",
    "копе",
    "недел",
    "штук",
    "тысяч",
    "единиц",
    "ноч",
    "позици",
    "заявк",
    "ставк",
    "попытк",
    "страниц",
    "поездк",
    "операци",
    "карт",
    "квартир",
    "комнат",
)
_NEUTER_STEMS: Final = ("мест", "окн", "сообщени", "письм", "заняти", "предложени", "очк")


# Digits left after the forms above (inside "0,12345", "1.2.3", "10:15:30"), unless glued to letters.
_LEFT_OVER: Final = re.compile(r"(?<!\w)[0-9]+(?!\w|-[^\W\d_])")


def verbalize(text: str) -> str:
    """``text`` with every number form it recognizes replaced by Russian words.

    Digits in no recognized form are said as numbers of up to four digits or digit by digit, so
    that no engine meets a digit group; only digits glued to letters ("A12", "1-го", "5G") are
    left for the engine.
    """
    text = _PATTERN.sub(_say, text)
    return _LEFT_OVER.sub(lambda m: " ".join(_groups(m.group())), text)


def _say(match: re.Match[str]) -> str:
    try:
        if match.group("phone") is not None:
            return phone_words(match.group("phone"))
        if match.group("date") is not None:
            return _date(match)
        if match.group("time") is not None:
            return time_words(dt.time(int(match.group("hh")), int(match.group("mi"))))
        if match.group("money") is not None:
            return _money(match)
        if match.group("pct") is not None:
            return _percent(match)
        if match.group("year") is not None:
            year = int(match.group("year"))
            word = match.group("year_word")
            if year < 1:
                raise VerbalizationError("year 0")
            return f"{year_ordinal(year, _YEAR_CASES[word])} {word}"
        if match.group("dec") is not None:
            sign = -1 if match.group("d_minus") else 1
            words = decimal_words(int(match.group("d_int")), match.group("d_frac"))
            return f"{MINUS} {words}" if sign < 0 else words
        return _integer(match)
    except (VerbalizationError, ValueError):
        # Out of range (a number of 13 digits, the 31st of February...): say its digit groups.
        return " ".join(_groups(match.group()))


def _groups(raw: str) -> list[str]:
    # Runs of up to four digits as numbers ("02" -> "ноль два"), longer ones digit by digit;
    # whatever separated them becomes a pause between words.
    out: list[str] = []
    for part in re.findall(r"[0-9]+|-", raw):
        if part == "-":
            out.append(MINUS if not out else "-")
        elif len(part) <= 4:
            out.append(digit_group_words(part))
        else:
            out.extend(map(digit_group_words, part))
    return out


def _date(match: re.Match[str]) -> str:
    return date_words(dt.date(int(match.group("yyyy")), int(match.group("mm")), int(match.group("dd"))))


def _money(match: re.Match[str]) -> str:
    rubles = _int(match.group("rub"))
    kopecks = int(match.group("m_frac") or match.group("kop") or 0)
    words = money_words(rubles, kopecks)
    return f"{MINUS} {words}" if match.group("m_minus") else words


def _percent(match: re.Match[str]) -> str:
    whole = _int(match.group("p_int"))
    frac = match.group("p_frac")
    if frac is not None:
        # After a fraction the noun takes the genitive singular: "две целых пять десятых процента".
        return f"{decimal_words(whole, frac)} {PERCENT[1]}"
    return counted_words(whole, PERCENT)


def _integer(match: re.Match[str]) -> str:
    raw = match.group("num")
    digits = raw.replace(" ", "")
    if len(digits) > 1 and digits[0] == "0":
        words = digit_group_words(digits)  # a code ("007", "0451"), not an amount
    else:
        words = number_words(int(digits), _gender_of_next(match))
    return f"{MINUS} {words}" if match.group("i_minus") else words


def _gender_of_next(match: re.Match[str]) -> Gender:
    nxt = _NEXT_WORD.match(match.string, match.end())
    if nxt is None:
        return "m"
    word = nxt.group(1).lower()
    if word.startswith(_FEMININE_STEMS):
        return "f"
    if word.startswith(_NEUTER_STEMS):
        return "n"
    return "m"


def _int(raw: str) -> int:
    return int(raw.replace(" ", ""))
