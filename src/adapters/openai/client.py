"""``OpenAILLMClient``: streams a structured answer from ``/chat/completions`` with the metadata first."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from datetime import UTC, datetime
from typing import Any, Final

import httpx
from opentelemetry import metrics, trace
from pydantic import BaseModel, ValidationError

from voxcore.adapters.openai._errors import error_for_exception, error_for_status, provider_message
from voxcore.adapters.openai.concurrency import Slot, gate_for
from voxcore.adapters.openai.config import OpenAIConfig
from voxcore.adapters.openai.connection import DURATION_BUCKETS, connection_reused
from voxcore.adapters.openai.structured_output import (
    Variant,
    apply_variant,
    first_variant,
    next_variant,
    refusal_hint,
    refuses_response_format,
    remember,
)
from voxcore.core.domain.models import (
    MAX_AGGRESSION,
    MIN_AGGRESSION,
    ConversationMessage,
    LLMStreamChunk,
)
from voxcore.core.domain.structured import (
    FieldValue,
    ObjectComplete,
    StructuredStreamError,
    StructuredStreamParser,
    TextComplete,
    TextDelta,
)
from voxcore.core.ports.errors import (
    LLMBadRequestError,
    LLMError,
    LLMProtocolError,
    LLMServerError,
    LLMTimeoutError,
)
from voxcore.core.ports.llm import AbstractLLMClient, GenerationResult, Prompt, TokenUsage
from voxcore.events import emit

log = logging.getLogger("voxcore.llm.client")

_tracer = trace.get_tracer("voxcore.llm")
_meter = metrics.get_meter("voxcore.llm")
_OPERATION_DURATION: Final = "gen_ai.client.operation.duration"
_TIME_TO_FIRST_CHUNK: Final = "gen_ai.client.operation.time_to_first_chunk"
_TOKEN_USAGE: Final = "gen_ai.client.token.usage"
# The GenAI semantic conventions' advisory buckets for token counts (1, 4, 16, ... 4^13).
_TOKEN_BUCKETS: Final = tuple(4**i for i in range(14))

CHAT_PATH: Final = "/chat/completions"
#: Top-level field of the structured answer whose text is streamed.
STREAM_FIELD: Final = "answer"
#: Fields the first yielded chunk carries (when the response model declares them).
METADATA_FIELDS: Final = ("is_safe", "aggression_score")
# Once the JSON answer is complete, the rest of the stream (finish and usage chunks, ``[DONE]``, the end of
# the body, read so the connection returns to the pool) may take this long: a server that stalls there
# costs the connection and the usage figures, never the end of the turn.
_TAIL_S: Final = 1.0
_DEBUG: Final = logging.DEBUG


def _histograms(meter: metrics.Meter) -> tuple[metrics.Histogram, metrics.Histogram]:
    duration = meter.create_histogram(
        _OPERATION_DURATION,
        unit="s",
        description="GenAI operation duration.",
        explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
    )
    ttfc = meter.create_histogram(
        _TIME_TO_FIRST_CHUNK,
        unit="s",
        description="Time to receive the first chunk of a streamed GenAI response.",
        explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
    )
    return duration, ttfc


def _token_histogram(meter: metrics.Meter) -> metrics.Histogram:
    return meter.create_histogram(
        _TOKEN_USAGE,
        unit="{token}",
        description="Number of input and output tokens used.",
        explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS,
    )


# The API's proxy meter: instruments bind to the real provider once a host installs one.
_operation_duration, _time_to_first_chunk = _histograms(_meter)
_token_usage_histogram = _token_histogram(_meter)


@functools.lru_cache(maxsize=64)
def _metadata_defaults(response_model: type[BaseModel]) -> dict[str, object]:
    """The metadata fields ``response_model`` declares, with the value to use when one never arrives."""
    defaults: dict[str, object] = {}
    for name in METADATA_FIELDS:
        info = response_model.model_fields.get(name)
        if info is not None:
            defaults[name] = None if info.is_required() else info.get_default(call_default_factory=True)
    return defaults


def _is_safe_value(value: object, default: object) -> bool | None:
    if isinstance(value, bool):
        return value
    return default if isinstance(default, bool) else None


def _aggression_value(value: object, default: object) -> int | None:
    # As the response model does: integral numbers are accepted and clamped to the domain's range.
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, MIN_AGGRESSION), MAX_AGGRESSION)
    return default if isinstance(default, int) and not isinstance(default, bool) else None


def _messages(prompt: Prompt) -> list[ConversationMessage]:
    if isinstance(prompt, str):
        return [ConversationMessage(role="user", content=prompt)]
    return list(prompt)


def _first_choice(obj: object) -> dict[str, Any] | None:
    """``choices[0]`` of a chunk when it is a dict (slow path: chunks without a content delta)."""
    choices = obj.get("choices") if isinstance(obj, dict) else None
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return None


def _token_usage(raw: object) -> TokenUsage | None:
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int):
        return TokenUsage(input_tokens=prompt, output_tokens=completion)
    return None


def _salvaged(
    parser: StructuredStreamParser, response_model: type[BaseModel], error: StructuredStreamError
) -> tuple[BaseModel, list[str]] | None:
    """The answer validated without the optional fields that failed validation, when that is enough.

    Returns ``None`` when the object is incomplete, the streamed field itself is invalid, or a required
    field failed.
    """
    cause = error.__cause__
    if not isinstance(cause, ValidationError):
        return None
    bad = sorted({str(item["loc"][0]) for item in cause.errors() if item.get("loc")})
    fields = response_model.model_fields
    required = {name for name, info in fields.items() if info.is_required()}
    if not bad or STREAM_FIELD in bad or required.intersection(bad):
        return None
    value = {key: item for key, item in parser.close().items() if key not in bad}
    try:
        return response_model.model_validate(value), bad
    except ValidationError:
        return None


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class OpenAILLMClient(AbstractLLMClient[httpx.AsyncClient]):
    """Chat-completions client for OpenAI-compatible providers, built for the voice hot path.

    :meth:`stream_structured_generate` POSTs a streamed request, parses the SSE lines as they arrive and
    feeds the content deltas to a :class:`~voxcore.core.domain.structured.StructuredStreamParser`. The
    first yielded chunk carries the safety metadata (``is_safe``, ``aggression_score``); answer deltas
    that arrive before it are held back until the metadata is known (or the object completed; then the
    response model's defaults fill in). The last chunk has ``is_final_chunk=True``; by then the response is
    closed, telemetry recorded and :attr:`last_result` set. Per chunk the work is: prefix check,
    ``json.loads``, a few dict lookups, one parser feed, one :class:`LLMStreamChunk`.

    Failures raise a typed ``LLMError`` (see ``voxcore.adapters.openai._errors``); the response is closed
    in every case (also when the consumer stops early: close the generator, e.g. with
    ``contextlib.aclosing``), one ``llm_error`` event is logged and :attr:`last_result` keeps its value.
    Timeouts: ``first_token_timeout_s`` bounds request sent -> first content token; after that httpx's
    read timeout bounds the silence between chunks, and ``turn_timeout_s`` the whole turn.

    Args:
        config: Provider and request settings.
        clock: Seconds for durations (``time.perf_counter``; injectable for tests).
        tracer: OpenTelemetry tracer (defaults to the ``voxcore.llm`` tracer of the global provider).
        meter: OpenTelemetry meter (defaults to the ``voxcore.llm`` meter of the global provider).

    Events (logger ``voxcore.llm.client``; DEBUG except ``llm_error``): ``request_send``
    ``{model, ts, stream, messages}``,
    ``first_token`` ``{ttft_ms}``, ``chunk`` ``{seq, size}`` (DEBUG), ``stream_end`` ``{total_ms, chunks,
    ttft_ms, input_tokens, output_tokens, finish_reason, connection_reused}``, ``completion_done``
    ``{ms, input_tokens, output_tokens}``, ``llm_error`` ``{error_type, status, message, model}``.
    """

    def __init__(
        self,
        config: OpenAIConfig,
        *,
        clock: Callable[[], float] = time.perf_counter,
        tracer: trace.Tracer | None = None,
        meter: metrics.Meter | None = None,
    ) -> None:
        self._config = config
        self._clock = clock
        self._tracer = tracer or _tracer
        if meter is None:
            self._duration, self._ttfc = _operation_duration, _time_to_first_chunk
            self._tokens = _token_usage_histogram
        else:
            self._duration, self._ttfc = _histograms(meter)
            self._tokens = _token_histogram(meter)
        self._server: dict[str, str | int] = {
            "server.address": config.server_address,
            "server.port": config.server_port,
        }
        self._last_result: GenerationResult | None = None
        self._last_ttft_ms: float | None = None
        self._tolerance_logged = False

    @property
    def config(self) -> OpenAIConfig:
        """The settings this client was built with."""
        return self._config

    @property
    def last_result(self) -> GenerationResult | None:
        """The result of the most recent successful stream (``None`` before any)."""
        return self._last_result

    @property
    def last_ttft_ms(self) -> float | None:
        """Request sent -> first token of the most recent stream, also one that failed or was closed."""
        return self._last_ttft_ms

    def _attributes(self, model: str, *, stream: bool, max_tokens: int) -> dict[str, Any]:
        config = self._config
        return {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": config.provider_name,
            "gen_ai.request.model": model,
            "gen_ai.request.stream": stream,
            "gen_ai.request.max_tokens": max_tokens,
            "gen_ai.request.temperature": config.temperature,
            **self._server,
        }

    def _metric_attributes(self, model: str, error_type: str | None = None) -> dict[str, str | int]:
        attributes: dict[str, str | int] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._config.provider_name,
            "gen_ai.request.model": model,
            **self._server,
        }
        if error_type is not None:
            attributes["error.type"] = error_type
        return attributes

    def _record_success(
        self, seconds: float, model: str, response_model: object, usage: TokenUsage | None
    ) -> None:
        """Duration and ``gen_ai.client.token.usage`` points, with ``gen_ai.response.model`` when known."""
        attributes = self._metric_attributes(model)
        if isinstance(response_model, str) and response_model:
            attributes["gen_ai.response.model"] = response_model
        self._duration.record(seconds, attributes)
        if usage is not None:
            self._tokens.record(usage.input_tokens, {**attributes, "gen_ai.token.type": "input"})
            self._tokens.record(usage.output_tokens, {**attributes, "gen_ai.token.type": "output"})

    def _failed(
        self,
        span: trace.Span,
        error: LLMError,
        *,
        model: str,
        status: int | None,
        elapsed_s: float,
    ) -> None:
        """Log, trace and measure one failed request."""
        error_type = str(status) if status is not None and status >= 400 else type(error).__name__
        span.set_status(trace.StatusCode.ERROR, str(error))
        span.set_attribute("error.type", error_type)
        span.record_exception(error)
        self._duration.record(elapsed_s, self._metric_attributes(model, error_type))
        emit(
            log,
            "llm_error",
            logging.ERROR,
            error_type=type(error).__name__,
            status=status,
            message=str(error),
            model=model,
        )

    async def _read_streamed(
        self, http_client: httpx.AsyncClient, body: dict[str, Any], model: str
    ) -> tuple[httpx.Response, dict[str, Any] | None]:
        """POST a streamed completion and assemble it into the shape of a non-streamed one.

        A stream that ends without a ``finish_reason`` was cut by the server (llama.cpp ends a running
        stream with ``[DONE]`` when another request arrives): that is an error, never a short text.
        """
        what = f"POST {CHAT_PATH}"
        async with http_client.stream("POST", CHAT_PATH, json=body) as response:
            if not response.is_success:
                await response.aread()
                return response, None
            parts: list[str] = []
            finish_reason: object = None
            usage: object = None
            name: object = None
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except ValueError as exc:
                    raise LLMProtocolError(
                        f"{what}: malformed SSE data from the provider: {data[:200]!r}"
                    ) from exc
                if not isinstance(obj, dict):
                    continue
                name = obj.get("model", name)
                if obj.get("usage"):
                    usage = obj["usage"]
                choice = _first_choice(obj)
                if choice is None:
                    continue
                delta = choice.get("delta")
                piece = delta.get("content") if isinstance(delta, dict) else None
                if isinstance(piece, str):
                    parts.append(piece)
                if choice.get("finish_reason") is not None:
                    finish_reason = choice["finish_reason"]
            if finish_reason is None:
                raise LLMProtocolError(
                    f"{what} (model {model}): the stream ended without a finish_reason (cut by the server "
                    f"after {len(parts)} pieces)"
                )
        payload = {
            "model": name,
            "choices": [{"message": {"content": "".join(parts)}, "finish_reason": finish_reason}],
            "usage": usage,
        }
        return response, payload

    def _first_token(self, ttft_s: float, model: str, debug: bool) -> None:
        """The first token's histogram and event, off the TTFT path."""
        self._ttfc.record(ttft_s, self._metric_attributes(model))
        if debug:
            emit(log, "first_token", logging.DEBUG, ttft_ms=round(ttft_s * 1000, 3), model=model)

    def _tolerated(self, parser: StructuredStreamParser, model: str) -> None:
        """Log (once per client at WARNING, then at DEBUG) text around the JSON object that was ignored."""
        level = logging.DEBUG if self._tolerance_logged else logging.WARNING
        self._tolerance_logged = True
        emit(
            log,
            "structured_text_ignored",
            level,
            model=model,
            skipped_chars=parser.skipped_chars,
            trailing_chars=parser.trailing_chars,
        )

    def _refused(
        self,
        status: int,
        response: httpx.Response,
        variant: Variant,
        body: dict[str, Any],
        messages: list[ConversationMessage],
        response_model: type[BaseModel],
    ) -> Variant:
        """After an error status: the next structured-output variant to try, or the error to raise."""
        config = self._config
        model = body["model"]
        what = f"POST {CHAT_PATH}"
        error = error_for_status(status, response.content, response.headers, what=what, model=model)
        if not refuses_response_format(status, response.content):
            raise error
        mode = config.structured_output
        following = next_variant(mode, variant)
        if following is None:
            hint = refusal_hint(mode, variant)
            message = f"{error} [structured_output {variant} refused: {hint}]"
            if isinstance(error, LLMServerError):
                raise LLMServerError(message, status=status, transient=False)
            raise LLMBadRequestError(message)
        remember(config.base_url, mode, following)
        emit(
            log,
            "structured_output_fallback",
            logging.WARNING,
            base_url=config.base_url,
            refused=variant,
            now=following,
            status=status,
            setting=f"llm.structured_output={mode}",
            message=provider_message(response.content),
        )
        apply_variant(body, messages, following, response_model)
        return following

    # -- streaming --------------------------------------------------------------------------------

    async def stream_structured_generate(
        self,
        http_client: httpx.AsyncClient,
        full_prompt: Prompt,
        model: str,
        response_model: type[BaseModel],
    ) -> AsyncGenerator[LLMStreamChunk, None]:
        """Stream ``response_model``'s ``answer`` as it is generated, safety metadata first.

        Args:
            http_client: A client whose ``base_url`` is the provider's API root (e.g. from
                :meth:`OpenAIConnectionManager.get_client`).
            full_prompt: Chat messages, or one text sent as a single user message.
            model: The model to ask.
            response_model: The structured answer's model; ``json_schema`` mode sends its strict schema.

        Yields:
            A metadata chunk (``text_chunk=""``, ``is_safe``, ``aggression_score``), one chunk per answer
            delta, then ``LLMStreamChunk("", is_final_chunk=True)``.

        Raises:
            LLMAuthError, LLMModelNotFoundError, LLMBadRequestError, LLMRateLimitedError, LLMServerError:
                the provider refused the request (HTTP status).
            LLMTimeoutError: connecting, the first token or a later chunk took too long, or the whole
                turn outlived ``turn_timeout_s``.
            LLMProtocolError: malformed SSE, a stream cut short, or an answer that is not valid JSON of
                ``response_model``.
        """
        config = self._config
        messages = _messages(full_prompt)
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": True,
            "max_tokens": config.max_output_tokens,
            "temperature": config.temperature,
        }
        if config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        mode = config.structured_output
        variant = first_variant(config.base_url, mode)
        apply_variant(body, messages, variant, response_model)
        defaults = _metadata_defaults(response_model)

        clock = self._clock
        span = self._tracer.start_span(
            f"chat {model}",
            kind=trace.SpanKind.CLIENT,
            attributes=self._attributes(model, stream=True, max_tokens=config.max_output_tokens),
        )
        parser = StructuredStreamParser(STREAM_FIELD)
        feed = parser.feed
        loads = json.loads
        debug = log.isEnabledFor(_DEBUG)
        missing = set(defaults)  # metadata fields not received yet
        received: dict[str, object] = {}
        pending: list[str] = []  # answer deltas held back until the metadata chunk is out
        meta_sent = False
        completed = False
        answer: str | None = None
        chunks = 0
        first_at: float | None = None
        usage_raw: object = None
        last_content: dict[str, Any] | None = None  # the last chunk that carried content
        finish_reason: str | None = None
        response_name: str | None = None
        refusal: list[str] = []
        status: int | None = None
        reused: bool | None = None
        error: LLMError | None = None
        done = False
        tail_armed = False
        succeeded = False
        what = f"POST {CHAT_PATH}"

        loop = asyncio.get_running_loop()
        # Events on the TTFT path are formatted off it: call_soon runs them while the loop waits
        # for the network (or after the first chunk has been handed over), in this context.
        if debug:
            loop.call_soon(
                functools.partial(
                    emit,
                    log,
                    "request_send",
                    logging.DEBUG,
                    model=model,
                    ts=_now_iso(),
                    stream=True,
                    messages=len(messages),
                )
            )
        gate = gate_for(config.base_url, config.max_concurrent_requests)
        slot: Slot | None = None
        self._last_ttft_ms = None
        sent = clock()
        now = loop.time()
        # Two deadlines share one timer: the first content token, and the whole turn. The timer is never
        # armed while chunks are yielded, so it cannot cancel the consumer's code between two chunks (a
        # turn deadline that passed meanwhile fires at the next wait). While the answer streams it stays
        # off as long as the read timeout alone ends a silence before the turn deadline: no timer work
        # per chunk on the hot path.
        turn_at = now + config.turn_timeout_s
        first_token_at = now + config.first_token_timeout_s
        read_s = config.read_timeout_s
        armed = True
        try:
            try:
                async with asyncio.timeout_at(min(first_token_at, turn_at)) as first_token_deadline:
                    if gate is not None:
                        slot = await gate.acquire_turn()
                    while True:
                        response = await http_client.send(
                            http_client.build_request("POST", CHAT_PATH, json=body), stream=True
                        )
                        if response.is_success:
                            break
                        try:
                            await response.aread()
                        finally:
                            await response.aclose()
                        status = response.status_code
                        variant = self._refused(status, response, variant, body, messages, response_model)
                    status = response.status_code
                    reused = connection_reused(response)
                    try:
                        lines = response.aiter_lines()
                        try:
                            async for line in lines:
                                if line.startswith("data: "):
                                    data = line[6:]
                                elif line.startswith("data:"):
                                    data = line[5:]
                                else:
                                    continue  # blank line, ": comment", "event:", "id:", "retry:"
                                if data == "[DONE]":
                                    done = True
                                    break
                                try:
                                    obj = loads(data)
                                except ValueError as exc:
                                    raise LLMProtocolError(
                                        f"{what}: malformed SSE data from the provider: {data[:200]!r}"
                                    ) from exc
                                try:
                                    choice = obj["choices"][0]
                                    content = choice["delta"].get("content")
                                except (KeyError, IndexError, TypeError, AttributeError):
                                    content = None
                                    choice = _first_choice(obj)
                                    if not isinstance(obj, dict):
                                        raise LLMProtocolError(
                                            f"{what}: SSE data is not a JSON object: {data[:200]!r}"
                                        ) from None
                                    if obj.get("error") is not None:
                                        message = provider_message(json.dumps(obj).encode())
                                        raise LLMProtocolError(
                                            f"{what} (model {model}): the provider reported an error "
                                            f"mid-stream: {message}"
                                        ) from None
                                if content:
                                    if armed:
                                        first_token_deadline.reschedule(None)
                                        armed = False
                                    if first_at is None:
                                        first_at = clock()
                                        ttft_s = first_at - sent
                                        self._last_ttft_ms = round(ttft_s * 1000, 3)
                                        span.set_attribute("gen_ai.response.time_to_first_chunk", ttft_s)
                                        # Recorded right after the first chunk has been handed over.
                                        loop.call_soon(self._first_token, ttft_s, model, debug)
                                    chunks += 1
                                    if debug:
                                        emit(log, "chunk", _DEBUG, seq=chunks, size=len(content))
                                    for event in feed(content):
                                        if isinstance(event, TextDelta):
                                            if meta_sent:
                                                yield LLMStreamChunk(event.text)
                                            else:
                                                pending.append(event.text)
                                        elif isinstance(event, FieldValue):
                                            if event.name in missing:
                                                missing.discard(event.name)
                                                received[event.name] = event.value
                                        elif isinstance(event, TextComplete):
                                            answer = event.text
                                        elif isinstance(event, ObjectComplete):
                                            completed = True
                                    if not meta_sent and (completed or not missing):
                                        meta_sent = True
                                        yield LLMStreamChunk(
                                            "",
                                            is_safe=_is_safe_value(
                                                received.get("is_safe"), defaults.get("is_safe")
                                            ),
                                            aggression_score=_aggression_value(
                                                received.get("aggression_score"),
                                                defaults.get("aggression_score"),
                                            ),
                                        )
                                        for text in pending:
                                            yield LLMStreamChunk(text)
                                        pending.clear()
                                    if completed:
                                        if not tail_armed:
                                            # Nothing is yielded any more (the object is closed): the rest
                                            # of the stream gets a short deadline of its own.
                                            tail_armed = True
                                            turn_at = min(turn_at, loop.time() + _TAIL_S)
                                        first_token_deadline.reschedule(turn_at)
                                        armed = True
                                    elif loop.time() + read_s >= turn_at:
                                        first_token_deadline.reschedule(turn_at)
                                        armed = True
                                    # finish_reason/usage rarely ride on a content chunk: only the last
                                    # one is checked, after the loop (keeps two lookups off the hot path).
                                    last_content = obj
                                    continue
                                # No content: the role chunk, the finish chunk, the usage chunk, a refusal.
                                if choice is not None:
                                    delta = choice.get("delta")
                                    piece = delta.get("refusal") if isinstance(delta, dict) else None
                                    if isinstance(piece, str):  # strict structured output may refuse
                                        refusal.append(piece)
                                    reason = choice.get("finish_reason")
                                    if reason is not None:
                                        finish_reason = reason
                                if response_name is None:
                                    response_name = obj.get("model")
                                raw_usage = obj.get("usage")
                                if raw_usage:
                                    usage_raw = raw_usage
                            if last_content is not None:
                                choice = _first_choice(last_content)
                                if finish_reason is None and choice is not None:
                                    finish_reason = choice.get("finish_reason")
                                if usage_raw is None:
                                    usage_raw = last_content.get("usage")
                                if response_name is None:
                                    response_name = last_content.get("model")
                            if done and completed:
                                # Read the end of the body so the connection returns to the pool.
                                async for _ in lines:
                                    pass
                        except httpx.HTTPError as exc:
                            if not completed:
                                raise
                            # The whole object arrived; only the tail ([DONE], usage) was lost.
                            emit(
                                log,
                                "stream_cut_after_object",
                                logging.WARNING,
                                model=model,
                                error=f"{type(exc).__name__}: {exc}",
                            )
                        finally:
                            aclose = getattr(lines, "aclose", None)
                            if aclose is not None:
                                await aclose()
                    finally:
                        await response.aclose()
            except TimeoutError as exc:
                if not completed:
                    if first_at is None and first_token_at <= turn_at:
                        raise LLMTimeoutError(
                            f"{what} (model {model}): no content within first_token_timeout_s="
                            f"{config.first_token_timeout_s:g} s"
                        ) from exc
                    raise LLMTimeoutError(
                        f"{what} (model {model}): the turn did not finish within turn_timeout_s="
                        f"{config.turn_timeout_s:g} s (llm.timeouts.turn_s; {chunks} chunks received)"
                    ) from exc
                # The whole answer arrived; only the tail (usage, [DONE]) was lost.
                emit(log, "stream_tail_timeout", logging.WARNING, model=model, tail_s=_TAIL_S)
            if not done and not completed:
                raise LLMProtocolError(
                    f"{what} (model {model}): the stream ended without [DONE] before the JSON answer was "
                    f"complete ({chunks} chunks)"
                )
            try:
                try:
                    instance = parser.validate(response_model)
                except StructuredStreamError as exc:
                    # The caller has heard the whole answer: a bad optional field must not take it back.
                    salvaged = _salvaged(parser, response_model, exc) if answer is not None else None
                    if salvaged is None:
                        raise
                    instance, dropped = salvaged
                    emit(log, "structured_fields_dropped", logging.WARNING, model=model, fields=dropped)
            except (StructuredStreamError, ValidationError) as exc:
                reason_text = ""
                if refusal:
                    reason_text = f" (the model refused: {''.join(refusal)[:300]})"
                elif finish_reason == "length":
                    reason_text = f" (cut at max_tokens={config.max_output_tokens}, finish_reason=length)"
                raise LLMProtocolError(
                    f"{what} (model {model}): invalid structured answer{reason_text}: {exc}"
                ) from exc
            if parser.has_trailing_text or parser.skipped_chars:
                self._tolerated(parser, model)
            succeeded = True
        except LLMError as exc:
            error = exc
            raise
        except httpx.HTTPError as exc:
            error = error_for_exception(exc, what=what, base_url=config.base_url)
            raise error from exc
        except StructuredStreamError as exc:
            error = LLMProtocolError(f"{what} (model {model}): invalid structured answer: {exc}")
            raise error from exc
        finally:
            if slot is not None:
                slot.release()
            if error is not None:
                self._failed(span, error, model=model, status=status, elapsed_s=clock() - sent)
                span.end()
            elif not succeeded:
                # Closed by the consumer (or cancelled) before the end: not an error of the provider.
                span.set_attribute("voxcore.cancelled", True)
                span.end()

        total_s = clock() - sent
        ttft_s = (first_at if first_at is not None else clock()) - sent
        usage = _token_usage(usage_raw)
        result = GenerationResult(
            response=instance,
            text=answer if answer is not None else "",
            usage=usage,
            ttft_ms=round(ttft_s * 1000, 3),
            total_ms=round(total_s * 1000, 3),
            chunks=chunks,
            connection_reused=reused,
        )
        if usage is not None:
            span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
        if finish_reason is not None:
            span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
        if isinstance(response_name, str):
            span.set_attribute("gen_ai.response.model", response_name)
        if reused is not None:
            span.set_attribute("voxcore.connection.reused", reused)
        span.end()
        self._record_success(total_s, model, response_name, usage)
        emit(
            log,
            "stream_end",
            logging.DEBUG,
            model=model,
            total_ms=result.total_ms,
            chunks=chunks,
            ttft_ms=result.ttft_ms,
            input_tokens=usage.input_tokens if usage is not None else None,
            output_tokens=usage.output_tokens if usage is not None else None,
            finish_reason=finish_reason,
            connection_reused=reused,
        )
        self._last_result = result
        yield LLMStreamChunk("", is_final_chunk=True)

    # -- plain completion -------------------------------------------------------------------------

    async def generate_text(
        self,
        http_client: httpx.AsyncClient,
        prompt: Prompt,
        model: str,
        *,
        max_tokens: int | None = None,
    ) -> str:
        """A completion's text (stripped), e.g. for summaries: background work that gives way to turns.

        With ``max_concurrent_requests`` set, the request waits for a slot of the provider's gate while
        turns hold or want them, is streamed (so that a server such as llama.cpp can stop it between two
        tokens) and, when a turn needs its slot, is dropped and asked again once the turn is done
        (event ``background_request_preempted``). Otherwise it is one non-streamed request.

        Args:
            http_client: A client whose ``base_url`` is the provider's API root.
            prompt: Chat messages, or one text sent as a single user message.
            model: The model to ask.
            max_tokens: Output bound; ``config.max_output_tokens`` when ``None``.

        Raises:
            LLMError: the same typed errors as :meth:`stream_structured_generate`.
        """
        gate = gate_for(self._config.base_url, self._config.max_concurrent_requests)
        if gate is None:
            return await self._complete(http_client, prompt, model, max_tokens, streamed=False)
        while True:
            slot = await gate.acquire_background()
            request = asyncio.create_task(
                self._complete(http_client, prompt, model, max_tokens, streamed=True),
                name="voxcore-llm-background",
            )
            assert slot.preempted is not None
            preempted = asyncio.create_task(slot.preempted.wait(), name="voxcore-llm-preempt-watch")
            try:
                await asyncio.wait({request, preempted}, return_when=asyncio.FIRST_COMPLETED)
                if request.done():
                    return request.result()
                emit(log, "background_request_preempted", model=model, base_url=self._config.base_url)
            finally:
                for task in (request, preempted):
                    task.cancel()
                await asyncio.gather(request, preempted, return_exceptions=True)
                slot.release()

    async def _complete(
        self,
        http_client: httpx.AsyncClient,
        prompt: Prompt,
        model: str,
        max_tokens: int | None,
        *,
        streamed: bool,
    ) -> str:
        config = self._config
        messages = _messages(prompt)
        limit = config.max_output_tokens if max_tokens is None else max_tokens
        body: dict[str, Any] = {
            "model": model,
            "messages": messages,
            "stream": False,
            "max_tokens": limit,
            "temperature": config.temperature,
        }
        what = f"POST {CHAT_PATH}"
        clock = self._clock
        status: int | None = None
        with self._tracer.start_as_current_span(
            f"chat {model}",
            kind=trace.SpanKind.CLIENT,
            attributes=self._attributes(model, stream=False, max_tokens=limit),
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            emit(
                log,
                "request_send",
                logging.DEBUG,
                model=model,
                ts=_now_iso(),
                stream=False,
                messages=len(messages),
            )
            sent = clock()
            try:
                try:
                    if streamed:
                        body["stream"] = True
                        response, streamed_payload = await self._read_streamed(http_client, body, model)
                    else:
                        response = await http_client.post(CHAT_PATH, json=body)
                        streamed_payload = None
                except httpx.HTTPError as exc:
                    raise error_for_exception(exc, what=what, base_url=config.base_url) from exc
                status = response.status_code
                if not response.is_success:
                    raise error_for_status(status, response.content, response.headers, what=what, model=model)
                try:
                    payload = response.json() if streamed_payload is None else streamed_payload
                    choice = payload["choices"][0]
                    content = choice["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError) as exc:
                    raise LLMProtocolError(
                        f"{what} (model {model}): unexpected completion body: {response.text[:200]!r}"
                    ) from exc
                if not isinstance(content, str):
                    message = choice["message"]
                    refusal = message.get("refusal") if isinstance(message, dict) else None
                    raise LLMProtocolError(
                        f"{what} (model {model}): the completion has no text content"
                        + (f" (the model refused: {refusal})" if refusal else "")
                    )
            except LLMError as exc:
                self._failed(span, exc, model=model, status=status, elapsed_s=clock() - sent)
                raise
            elapsed = clock() - sent
            usage = _token_usage(payload.get("usage"))
            finish_reason = choice.get("finish_reason")
            reused = connection_reused(response)
            if usage is not None:
                span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
            if isinstance(finish_reason, str):
                span.set_attribute("gen_ai.response.finish_reasons", [finish_reason])
            if isinstance(payload.get("model"), str):
                span.set_attribute("gen_ai.response.model", payload["model"])
            if reused is not None:
                span.set_attribute("voxcore.connection.reused", reused)
            self._record_success(elapsed, model, payload.get("model"), usage)
        emit(
            log,
            "completion_done",
            logging.DEBUG,
            model=model,
            ms=round(elapsed * 1000, 3),
            input_tokens=usage.input_tokens if usage is not None else None,
            output_tokens=usage.output_tokens if usage is not None else None,
            finish_reason=finish_reason,
            connection_reused=reused,
        )
        return content.strip()
