"""Generate the shipped speech-like test audio (deterministic, pure Python).

Writes ``src/entrypoints/assets/example.wav`` (SPEC-C's example, ~3 s, 16 kHz mono 16-bit) and the
demo fragments in ``src/entrypoints/assets/fragments/`` with their manifest. Re-running produces
identical files.

The signal is "speech-like", not speech: syllables of a glottal pulse train (jittered pitch
contour) shaped by vowel formants, with noise bursts for consonants and short pauses, so chunk
sizes, silences and spectra resemble a real recording.
"""

from __future__ import annotations

import math
import random
import struct
import wave
from pathlib import Path

RATE = 16_000
ROOT = Path(__file__).resolve().parent.parent
# (F1, F2, F3) in Hz of a few vowels
VOWELS = [(730, 1090, 2440), (270, 2290, 3010), (300, 870, 2240), (530, 1840, 2480), (570, 840, 2410)]


def _syllable(rng: random.Random, f0: float, seconds: float) -> list[float]:
    f1, f2, f3 = rng.choice(VOWELS)
    n = int(seconds * RATE)
    out: list[float] = []
    consonant = int(rng.uniform(0.02, 0.06) * RATE)
    for i in range(consonant):  # fricative/plosive onset: shaped noise
        out.append(rng.gauss(0.0, 0.08) * (1 - i / consonant))
    phase = 0.0
    harmonics = range(1, 30)
    for i in range(n):
        t = i / RATE
        pitch = f0 * (1 + 0.06 * math.sin(2 * math.pi * 3 * t)) * (1 + rng.gauss(0, 0.003))
        phase += 2 * math.pi * pitch / RATE
        sample = 0.0
        for h in harmonics:
            fh = h * pitch
            if fh > RATE / 2:
                break
            gain = sum(1.0 / (1 + ((fh - f) / 90.0) ** 2) for f in (f1, f2, f3)) / h**0.5
            sample += gain * math.sin(h * phase)
        env = math.sin(math.pi * min(1.0, i / n)) ** 0.6
        out.append(0.09 * sample * env)
    return out


def speechlike(seconds: float, seed: int) -> bytes:
    """Return 16-bit mono PCM of about ``seconds`` seconds."""
    rng = random.Random(seed)
    samples: list[float] = [0.0] * int(0.05 * RATE)
    while len(samples) < seconds * RATE:
        f0 = rng.uniform(105, 150)
        for _ in range(rng.randint(2, 4)):  # a "word"
            samples += _syllable(rng, f0, rng.uniform(0.09, 0.2))
            f0 *= rng.uniform(0.95, 1.03)
        samples += [rng.gauss(0.0, 0.002) for _ in range(int(rng.uniform(0.06, 0.18) * RATE))]
    samples = samples[: int(seconds * RATE)]
    return b"".join(struct.pack("<h", max(-32767, min(32767, int(s * 32767)))) for s in samples)


def write_wav(path: Path, pcm: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm)


def main() -> None:
    write_wav(ROOT / "src/entrypoints/assets/example.wav", speechlike(3.0, seed=1))
    fragments = {
        "greeting": ("Здравствуйте!", 1.2, 2),
        "intro": ("Ваша стоимость составляет", 1.6, 3),
        "currency_rub_one": ("рубль", 0.6, 4),
        "currency_rub_few": ("рубля", 0.6, 6),
        "currency_rub_many": ("рублей", 0.7, 7),
        "one_moment": ("Минуточку...", 0.9, 5),
    }
    lines = [
        "# Demo fragments for `voxcore load-audio` (speech-like placeholders; see scripts/).",
        "fragments:",
    ]
    for name, (transcript, seconds, seed) in fragments.items():
        write_wav(ROOT / f"src/entrypoints/assets/fragments/{name}.wav", speechlike(seconds, seed))
        lines += [f"  - key: static:{name}", f"    file: {name}.wav", f'    transcript: "{transcript}"']
    (ROOT / "src/entrypoints/assets/fragments/manifest.yml").write_text(
        "\n".join(lines) + "\n", encoding="utf-8"
    )


if __name__ == "__main__":
    main()
