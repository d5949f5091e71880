"""Hybrid reply domain: playlists, silence, rechunking, Russian plurals, TTS text and cache keys."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from voxcore.core.domain.audio import AudioFormat, plan_chunks, split_pcm
from voxcore.core.domain.errors import DomainError, InvalidAudioError
from voxcore.core.domain.playlist import (
    MAX_PAUSE_MS,
    PauseItem,
    Playlist,
    PlaylistError,
    Rechunker,
    StaticItem,
    TTSItem,
    can_join,
    silence,
)
from voxcore.core.domain.russian import (
    NUMBER_PACK,
    format_amount,
    hybrid_amount_playlist,
    plural_form,
    say_money,
    unit_fragment_key,
)
from voxcore.core.domain.tts_text import InvalidTTSTextError, normalize_tts_text, tts_cache_key

PCM16 = AudioFormat(16_000, 1, 2)
RUB = ("рубль", "рубля", "рублей")
WORD_OF = {f"static:{name}": word for word, name in NUMBER_PACK.items()}

# -- playlist ---------------------------------------------------------------------------------------


def test_playlist_keeps_order_and_exposes_parts() -> None:
    playlist = Playlist.of(
        StaticItem("static:intro"), TTSItem("12500"), PauseItem(200), StaticItem("static:currency_rub_many")
    )
    assert len(playlist) == 4
    assert [type(i) for i in playlist] == [StaticItem, TTSItem, PauseItem, StaticItem]
    assert playlist.static_keys == ("static:intro", "static:currency_rub_many")
    assert playlist.tts_texts == ("двенадцать тысяч пятьсот",)


def test_playlist_accepts_a_list_and_stores_a_tuple() -> None:
    playlist = Playlist([StaticItem("static:a")])  # type: ignore[arg-type]
    assert playlist.items == (StaticItem("static:a"),)


@pytest.mark.parametrize(
    "items",
    [(), ("static:a",), (StaticItem("static:a"), None), [], "static:a"],
    ids=["empty", "bare-string-item", "none-item", "empty-list", "string"],
)
def test_playlist_refuses_empty_or_foreign_items(items: object) -> None:
    with pytest.raises(PlaylistError):
        Playlist(items)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key", ["", "static:", "intro", "tts:12500", "summary:session:x", "static:" + "a" * 2000]
)
def test_static_item_needs_a_valid_static_key(key: str) -> None:
    with pytest.raises(PlaylistError):
        StaticItem(key)


def test_static_item_refuses_non_string_key() -> None:
    with pytest.raises(PlaylistError):
        StaticItem(42)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["", "   ", "\u00a0\u202f\t\n", "\u200b\ufeff"])
def test_tts_item_needs_text_after_normalization(text: str) -> None:
    with pytest.raises(PlaylistError):
        TTSItem(text)


def test_tts_item_stores_normalized_text_and_is_a_domain_error_otherwise() -> None:
    assert TTSItem("  12\u00a0500\n").text == "двенадцать тысяч пятьсот"
    assert TTSItem("12 500") == TTSItem("12500")
    with pytest.raises(DomainError):  # PlaylistError is a DomainError (and a ValueError)
        TTSItem(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("ms", [1, 250, MAX_PAUSE_MS])
def test_pause_in_range(ms: int) -> None:
    assert PauseItem(ms).ms == ms


@pytest.mark.parametrize("ms", [0, -1, MAX_PAUSE_MS + 1, 1.5, True, "100", None])
def test_pause_out_of_range_or_wrong_type(ms: object) -> None:
    with pytest.raises(PlaylistError):
        PauseItem(ms)  # type: ignore[arg-type]


def test_items_are_frozen_and_slotted() -> None:
    item = StaticItem("static:a")
    with pytest.raises(AttributeError):
        item.key = "static:b"  # type: ignore[misc]
    assert not hasattr(item, "__dict__")
    assert not hasattr(Playlist.of(item), "__dict__")


# -- joining and silence ----------------------------------------------------------------------------


def test_can_join_needs_the_same_layout() -> None:
    assert can_join(PCM16, AudioFormat(16_000, 1, 2, "pcm_s16le"))
    assert not can_join(PCM16, AudioFormat(24_000, 1, 2))
    assert not can_join(PCM16, AudioFormat(16_000, 2, 2))
    assert not can_join(PCM16, AudioFormat(16_000, 1, 4))
    assert not can_join(AudioFormat(8_000, 1, 1), AudioFormat(8_000, 1, 1, "pcm_mulaw"))


@pytest.mark.parametrize(
    ("fmt", "ms", "expected"),
    [
        (AudioFormat(8_000, 1, 1), 10, b"\x80" * 80),  # unsigned 8-bit: midpoint
        (AudioFormat(8_000, 1, 1, "pcm_mulaw"), 10, b"\xff" * 80),  # G.711 mu-law zero
        (AudioFormat(8_000, 1, 1, "pcm_alaw"), 10, b"\xd5" * 80),  # G.711 A-law zero
        (AudioFormat(16_000, 1, 2), 20, b"\x00" * 640),
        (AudioFormat(48_000, 2, 3), 1, b"\x00" * 288),
        (AudioFormat(24_000, 1, 4), 5, b"\x00" * 480),
        (AudioFormat(16_000, 1, 2), 0, b""),
    ],
)
def test_silence_level_and_length_per_encoding(fmt: AudioFormat, ms: int, expected: bytes) -> None:
    assert silence(fmt, ms) == expected


@given(
    rate=st.integers(1, 192_000),
    channels=st.integers(1, 8),
    width=st.sampled_from([1, 2, 3, 4]),
    ms=st.integers(0, 2_000),
)
def test_silence_is_whole_frames(rate: int, channels: int, width: int, ms: int) -> None:
    fmt = AudioFormat(rate, channels, width)
    data = silence(fmt, ms)
    assert len(data) % fmt.frame_size == 0
    assert len(data) // fmt.frame_size == rate * ms // 1000
    assert set(data) <= {0x80 if width == 1 else 0x00}


@pytest.mark.parametrize("ms", [-1, 1.5, True, None])
def test_silence_refuses_bad_length(ms: object) -> None:
    with pytest.raises(PlaylistError):
        silence(PCM16, ms)  # type: ignore[arg-type]


# -- rechunking -------------------------------------------------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@given(
    rate=st.sampled_from([8_000, 16_000, 22_050, 24_000, 44_100, 48_000, 7]),
    channels=st.integers(1, 2),
    width=st.sampled_from([1, 2, 3, 4]),
    chunk_ms=st.sampled_from([20, 10, 1, 33]),
    nbytes=st.integers(0, 12_000),
    cuts=st.lists(st.integers(0, 12_000), max_size=40),
)
def test_any_split_gives_the_one_shot_chunks(
    rate: int, channels: int, width: int, chunk_ms: int, nbytes: int, cuts: list[int]
) -> None:
    fmt = AudioFormat(rate, channels, width)
    data = bytes(i * 31 % 251 for i in range(nbytes))
    whole = data[: len(data) - len(data) % fmt.frame_size]
    expected = split_pcm(whole, plan_chunks(fmt, chunk_ms))

    rechunker = Rechunker(fmt, chunk_ms)
    got: list[bytes] = []
    for piece in split_at(data, cuts):
        got += rechunker.feed(piece)
        assert rechunker.pending < rechunker.chunk_bytes
    last = rechunker.flush()
    if last is not None:
        got.append(last)

    assert got == expected
    assert all(len(c) % fmt.frame_size == 0 and c for c in got)
    assert all(len(c) == rechunker.chunk_bytes for c in got[:-1])
    assert rechunker.pending == 0


def test_rechunker_20ms_at_16k_and_reuse() -> None:
    rechunker = Rechunker(PCM16)
    assert rechunker.chunk_bytes == 640
    assert rechunker.feed(b"\x01" * 639) == []
    assert rechunker.feed(b"\x02" * 3) == [b"\x01" * 639 + b"\x02"]
    assert rechunker.pending == 2
    assert rechunker.flush() == b"\x02\x02"
    assert rechunker.flush() is None
    assert rechunker.feed(memoryview(b"\x03" * 1280)) == [b"\x03" * 640] * 2
    assert rechunker.feed(bytearray(b"\x04")) == []
    assert rechunker.flush() is None  # half a frame cannot be played: dropped


def test_rechunk_iterates_a_finished_stream() -> None:
    pieces = [b"\x00" * 100] * 15  # 1500 bytes at 640 per chunk
    assert [len(c) for c in Rechunker(PCM16).rechunk(pieces)] == [640, 640, 220]


def test_rechunker_refuses_bad_chunk_length() -> None:
    with pytest.raises(InvalidAudioError):
        Rechunker(PCM16, 0)


# -- Russian plurals --------------------------------------------------------------------------------


def reference_plural(n: int) -> int:
    """The CLDR rule for Russian cardinals, written independently: 0 one, 1 few, 2 many."""
    n = abs(n)
    if n % 10 == 1 and n % 100 != 11:
        return 0
    if n % 10 in (2, 3, 4) and n % 100 not in (12, 13, 14):
        return 1
    return 2


@pytest.mark.parametrize(
    ("n", "word"),
    [
        (0, "рублей"),
        (1, "рубль"),
        (2, "рубля"),
        (3, "рубля"),
        (4, "рубля"),
        (5, "рублей"),
        (10, "рублей"),
        (11, "рублей"),
        (12, "рублей"),
        (14, "рублей"),
        (15, "рублей"),
        (20, "рублей"),
        (21, "рубль"),
        (22, "рубля"),
        (24, "рубля"),
        (25, "рублей"),
        (101, "рубль"),
        (111, "рублей"),
        (112, "рублей"),
        (114, "рублей"),
        (121, "рубль"),
        (1001, "рубль"),
        (12_500, "рублей"),
        (1_000_000, "рублей"),
        (-1, "рубль"),
        (-2, "рубля"),
        (-11, "рублей"),
    ],
)
def test_plural_table(n: int, word: str) -> None:
    assert plural_form(n, *RUB) == word


@given(st.integers(-(10**12), 10**12))
def test_plural_matches_reference(n: int) -> None:
    assert plural_form(n, *RUB) == RUB[reference_plural(n)]


@pytest.mark.parametrize("bad", [1.0, "1", True, None])
def test_plural_needs_an_int(bad: object) -> None:
    with pytest.raises(TypeError):
        plural_form(bad, *RUB)  # type: ignore[arg-type]


def test_unit_fragment_key_convention() -> None:
    assert unit_fragment_key(1) == "static:currency_rub_one"
    assert unit_fragment_key(3) == "static:currency_rub_few"
    assert unit_fragment_key(12_500) == "static:currency_rub_many"
    assert unit_fragment_key(21, base="minute") == "static:minute_one"
    for bad in ("", "static:currency_rub"):
        with pytest.raises(DomainError):
            unit_fragment_key(1, base=bad)


@pytest.mark.parametrize(
    ("amount", "words"),
    [
        (1, "один рубль"),
        (2, "два рубля"),
        (5, "пять рублей"),
        (11, "одиннадцать рублей"),
        (21, "двадцать один рубль"),
        (12_500, "двенадцать тысяч пятьсот рублей"),
        (21_001, "двадцать одна тысяча один рубль"),
    ],
)
def test_hybrid_amount_playlist_is_intro_and_word_fragments(amount: int, words: str) -> None:
    playlist = hybrid_amount_playlist(amount)
    assert playlist.items == (StaticItem("static:intro"), *say_money(amount).items)
    assert playlist.tts_texts == ()
    assert [WORD_OF[key] for key in playlist.static_keys[1:]] == words.split()


def test_hybrid_amount_playlist_custom_keys_and_bad_input() -> None:
    playlist = hybrid_amount_playlist(3, intro_key="static:total", unit_base="minute")
    assert playlist.static_keys == ("static:total", "static:num_3", "static:minute_few")
    with pytest.raises(PlaylistError):
        hybrid_amount_playlist(3, intro_key="intro")
    with pytest.raises(TypeError):
        hybrid_amount_playlist(2.5)  # type: ignore[arg-type]


def test_format_amount_is_the_words_a_tts_engine_is_given() -> None:
    assert [format_amount(n) for n in (0, 999, 9_999, 10_000, 1_234_567, -12_500)] == [
        "ноль",
        "девятьсот девяносто девять",
        "девять тысяч девятьсот девяносто девять",
        "десять тысяч",
        "один миллион двести тридцать четыре тысячи пятьсот шестьдесят семь",
        "минус двенадцать тысяч пятьсот",
    ]


# -- TTS text normalization -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "variants",
    [
        ["12500", "12 500", "12\u00a0500", "12\u202f500", "12\u2009500", " 12  500 ", "\t12500\n"],
        ["1000", "1 000", "1\u00a0000"],
        ["1 000 000", "1000000", "1\u202f000\u202f000"],
        ["12 500 рублей", "12500 рублей", "12500   рублей", "12\u00a0500\u00a0рублей"],
        ["й", "и\u0306", "и\u200b\u0306"],  # NFC, also after an invisible character is removed
        ["«Привет»", "“Привет”", "„Привет“", '"Привет"'],
        ["да — нет", "да – нет", "да ― нет"],
        ["-5", "\u22125"],
        ["кто-то", "кто\u2010то", "кто\u2011то", "кто-\u00adто"],
        ["Минуточку…", "Минуточку..."],
        ["Иван", "\ufeffИван\u200b"],
    ],
)
def test_equivalent_texts_normalize_alike(variants: list[str]) -> None:
    assert len({normalize_tts_text(v) for v in variants}) == 1


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("12,500", "12500"),  # the Russian comma is decimal: 12.5
        ("12.5", "12,5"),
        ("все", "всё"),
        ("ООО", "ооо"),
        ("007", "7"),
        ("12345 678", "12345678"),  # two numbers, or a typo: never merged
        ("8 800 555 35 35", "8800555 35 35"),
        ("12 500", "125 00"),
        ("0,12345", "0,12 345"),
        ("A12500", "A12 500"),
        ("да — нет", "да - нет"),  # a pause is not a hyphen
    ],
)
def test_different_texts_stay_different(a: str, b: str) -> None:
    assert normalize_tts_text(a) != normalize_tts_text(b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  Ваша   стоимость\nсоставляет  ", "Ваша стоимость составляет"),
        ("12500", "двенадцать тысяч пятьсот"),
        ("10000", "десять тысяч"),
        ("9999", "девять тысяч девятьсот девяносто девять"),
        ("1 000", "одна тысяча"),
        ("12500,50", "двенадцать тысяч пятьсот целых пятьдесят сотых"),
        ("Итого: 12500.", "Итого: двенадцать тысяч пятьсот."),
        ("-12500", "минус двенадцать тысяч пятьсот"),
        ("8 800 555 35 35", "восемь восемьсот пятьсот пятьдесят пять тридцать пять тридцать пять"),
        ("00012", "ноль ноль ноль двенадцать"),
        ("A12", "A12"),  # glued to letters: left to the engine
        ("", ""),
    ],
)
def test_normalized_forms(text: str, expected: str) -> None:
    assert normalize_tts_text(text) == expected


@given(
    st.text(
        alphabet=st.sampled_from(list("0123456789 ,.-—–«»\u00a0\u202f\u2009\u200bаёйи\u0306A\n")), max_size=40
    )
)
def test_normalization_is_idempotent_and_tidy(text: str) -> None:
    once = normalize_tts_text(text)
    assert normalize_tts_text(once) == once
    assert once == once.strip() and "  " not in once
    assert not re.search(r"(?<!\w)[0-9]+(?!\w|-\w)", once)  # no digit group reaches an engine
    assert not re.search(r"[\u00a0\u202f\u2009\u200b\n]", once)


# An unformatted run of 11 digits starting with 8 is a phone number (89991234567), not 8x billion.
@given(st.integers(0, 10**12 - 1).filter(lambda n: not (len(str(n)) == 11 and str(n)[0] == "8")))
def test_every_grouping_of_an_integer_normalizes_alike(n: int) -> None:
    digits = str(n)
    head = len(digits) % 3 or 3
    grouped = " ".join([digits[:head]] + [digits[i : i + 3] for i in range(head, len(digits), 3)])
    assert (
        normalize_tts_text(digits)
        == normalize_tts_text(grouped)
        == normalize_tts_text(grouped.replace(" ", "\u00a0"))
    )
    assert not re.search(r"[0-9]", normalize_tts_text(digits))


def test_normalize_refuses_non_text() -> None:
    with pytest.raises(InvalidTTSTextError):
        normalize_tts_text(12500)  # type: ignore[arg-type]


# -- TTS cache keys ---------------------------------------------------------------------------------

KEY_ARGS = {"voice": "alloy", "model": "gpt-4o-mini-tts", "engine": "openai", "audio_format": PCM16}


def test_cache_key_shape_and_stability() -> None:
    key = tts_cache_key("12500", **KEY_ARGS)  # type: ignore[arg-type]
    assert re.fullmatch(r"tts:[0-9a-f]{32}", key)
    assert key == tts_cache_key("12500", **KEY_ARGS)  # type: ignore[arg-type]
    # Pinned: keys must not drift between releases (cached audio would be orphaned); a deliberate
    # change of normalization or payload bumps TTS_KEY_VERSION and this value.
    assert key == "tts:8208fc54832f36288169c6661560c561"


@pytest.mark.parametrize("same", ["12 500", "12\u00a0500", " 12500 ", "12\u202f500"])
def test_cache_key_shared_by_equivalent_texts(same: str) -> None:
    assert tts_cache_key(same, **KEY_ARGS) == tts_cache_key("12500", **KEY_ARGS)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"text": "12501"},
        {"text": "12,500"},
        {"voice": "nova"},
        {"model": ""},
        {"engine": "espeak-ng"},
        {"audio_format": AudioFormat(24_000, 1, 2)},
        {"audio_format": AudioFormat(16_000, 2, 2)},
        {"audio_format": AudioFormat(16_000, 1, 4)},
        {"audio_format": AudioFormat(16_000, 1, 2, "pcm_s16be")},
        {"speed": 1.25},
    ],
)
def test_cache_key_changes_with_any_field(change: dict[str, object]) -> None:
    base: dict[str, object] = {"text": "12500", **KEY_ARGS}
    assert tts_cache_key(**{**base, **change}) != tts_cache_key(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "bad",
    [
        {"text": "  \u200b "},
        {"voice": ""},
        {"engine": ""},
        {"model": None},
        {"audio_format": "pcm"},
        {"speed": 0},
        {"speed": float("nan")},
        {"speed": float("inf")},
    ],
)
def test_cache_key_refuses_bad_input(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidTTSTextError):
        tts_cache_key(**{"text": "12500", **KEY_ARGS, **bad})  # type: ignore[arg-type]
