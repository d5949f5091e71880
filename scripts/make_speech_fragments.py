"""Record every shipped fragment as real Russian speech with espeak-ng (reproducible).

Writes, in the demo's format (16 kHz mono 16-bit WAV):

* ``src/entrypoints/assets/example.wav`` (SPEC-C's example for ``probe-cache``, ~3 s);
* the demo fragments in ``src/entrypoints/assets/fragments/`` and their manifest
  ``src/entrypoints/assets/manifest.yml``;
* the number fragment pack (one fragment per word of
  :data:`voxcore.core.domain.russian.NUMBER_PACK`) in ``src/entrypoints/assets/numbers/`` and its
  manifest ``src/entrypoints/assets/manifest_numbers.yml``.

Each transcript is spoken by ``espeak-ng -v ru`` (the text on stdin), resampled from 22050 Hz with
soxr, its edge silence cut to 15 ms and its edges faded (``voxcore.core.domain.joins``), so the
fragments join without holes or clicks. The same espeak-ng version gives byte-identical files; the
manifests record the version used.

Usage: ``.venv/bin/python scripts/make_speech_fragments.py [--check]`` (``--check`` only verifies
that every manifest entry has its file and every pack word its entry).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import soxr

from voxcore.core.domain.audio import AudioFormat
from voxcore.core.domain.joins import trim_silence
from voxcore.core.domain.russian import NUMBER_PACK

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "src" / "entrypoints" / "assets"
RATE = 16_000
FORMAT = AudioFormat(RATE, 1, 2)
VOICE = "ru"
EDGE_MS = 15

#: The demo fragments: key name -> transcript.
DEMO_FRAGMENTS = {
    "greeting": "Здравствуйте!",
    "intro": "Ваша стоимость составляет",
    "one_moment": "Минуточку...",
}
EXAMPLE_TEXT = "Здравствуйте! Это пример записи для проверки кэша."


def espeak_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    return " ".join(out.split()[:4])


def speak(binary: str, text: str) -> bytes:
    """``text`` spoken by espeak-ng, as 16 kHz mono s16le PCM with trimmed, faded edges."""
    wav = subprocess.run(
        [binary, "-v", VOICE, "-b", "1", "--stdin", "--stdout"],
        input=text.encode("utf-8"),
        capture_output=True,
        check=True,
    ).stdout
    # espeak-ng cannot seek on a pipe: the sizes in its header are placeholders, the data runs to EOF.
    if wav[:4] != b"RIFF" or wav[8:12] != b"WAVE" or wav[20:24] != b"\x01\x00\x01\x00":
        raise RuntimeError(f"espeak-ng did not write mono PCM WAV for {text!r}")
    data_at = wav.index(b"data") + 8
    rate = int.from_bytes(wav[24:28], "little")
    samples = np.frombuffer(wav[data_at : len(wav) - (len(wav) - data_at) % 2], dtype="<i2")
    resampled = soxr.resample(samples.astype(np.float32) / 32768.0, rate, RATE, quality="HQ")
    pcm = np.clip(np.round(resampled * 32768.0), -32768, 32767).astype("<i2").tobytes()
    return trim_silence(pcm, FORMAT, keep_ms=EDGE_MS)


def write_wav(path: Path, pcm: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(pcm)


def _yaml_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_manifest(path: Path, header: str, entries: list[tuple[str, str, str]]) -> None:
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines.append("fragments:")
    for key, file, transcript in entries:
        lines += [f"  - key: static:{key}", f"    file: {file}", f"    transcript: {_yaml_str(transcript)}"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def pack_entries() -> list[tuple[str, str, str]]:
    return [(name, f"numbers/{name}.wav", word) for word, name in NUMBER_PACK.items()]


def demo_entries() -> list[tuple[str, str, str]]:
    entries = [(name, f"fragments/{name}.wav", text) for name, text in DEMO_FRAGMENTS.items()]
    entries.append(("test_example", "example.wav", EXAMPLE_TEXT))
    return entries


def check() -> int:
    missing = [file for _, file, _ in demo_entries() + pack_entries() if not (ASSETS / file).is_file()]
    for file in missing:
        print(f"missing: {file}", file=sys.stderr)
    return 1 if missing else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the files exist; write nothing")
    parser.add_argument("--espeak", default="espeak-ng", help="the espeak-ng binary")
    args = parser.parse_args()
    if args.check:
        return check()
    binary = shutil.which(args.espeak)
    if binary is None:
        print("espeak-ng is not installed (Debian: apt-get install espeak-ng)", file=sys.stderr)
        return 1
    version = espeak_version(binary)
    for folder in ("fragments", "numbers"):
        for old in (ASSETS / folder).glob("*.wav"):
            old.unlink()
    made = 0
    for entries in (demo_entries(), pack_entries()):
        for _, file, text in entries:
            write_wav(ASSETS / file, speak(binary, text))
            made += 1
    origin = (
        f"Recorded by scripts/make_speech_fragments.py with {version}, voice '{VOICE}',\n"
        f"16 kHz mono 16-bit, edge silence cut to {EDGE_MS} ms. Do not edit: re-run the script."
    )
    write_manifest(
        ASSETS / "manifest.yml", "Demo fragments and the cache probe's example.\n" + origin, demo_entries()
    )
    write_manifest(
        ASSETS / "manifest_numbers.yml",
        "The number fragment pack: one word per fragment (voxcore.core.domain.russian.NUMBER_PACK).\n"
        + origin,
        pack_entries(),
    )
    print(f"{made} fragments written with {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
