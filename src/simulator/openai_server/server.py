"""``OpenAISimulator``: the simulator's lifecycle, plans, request history, routing and admin API."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from voxcore.simulator.embeddings import (
    DEFAULT_EMBEDDING_MODELS,
    EMBEDDINGS_PATH,
    EmbeddingBackend,
    default_backend,
    embeddings_payload,
    validate_embeddings,
)
from voxcore.simulator.openai_server.chat import _ChatRoutes
from voxcore.simulator.openai_server.plans import (
    _STATUS_FAULTS,
    ADMIN_PREFIX,
    AUDIO_SPEECH_PATH,
    CHAT_COMPLETIONS_PATH,
    DEFAULT_MODELS,
    MODELS_PATH,
    OWNED_BY,
    Fault,
    RecordedRequest,
    ReplyPolicy,
    ReplyValue,
    RequestPlan,
    _json_or_none,
)
from voxcore.simulator.openai_server.replies import ScriptedReplies, _as_policy
from voxcore.simulator.openai_server.speech import (
    _DEFAULT_SPEECH_CHUNK_BYTES,
    DEFAULT_SPEECH_MODELS,
    _SpeechRoutes,
)
from voxcore.simulator.openai_server.wire import (
    _MAX_HEAD_BYTES,
    _Connection,
    _mask_key,
    _Request,
    _retry_after_headers,
)

log = logging.getLogger("voxcore.simulator.openai_server")

_MODEL_CREATED = 1_700_000_000


class OpenAISimulator(_ChatRoutes, _SpeechRoutes):
    """A local SIMULATOR of the OpenAI HTTP API on 127.0.0.1.

    Routes: ``/v1/models``, ``/v1/chat/completions`` and ``/v1/audio/speech`` (``response_format`` ``pcm``
    or ``wav``: synthetic speech-like audio from ``synthetic_speech``, streamed in ``speech_chunk_bytes``
    chunks; ``first_token_delay_ms`` delays the first byte, ``inter_chunk_delay_ms`` separates chunks).

    It speaks real HTTP/1.1 (keep-alive, ``Content-Length`` or chunked bodies, SSE streaming, OpenAI error
    bodies and status codes) but answers from a reply policy, with tunable timing and injectable faults.

    Args:
        host: Interface to bind (loopback by default).
        port: Port to bind; 0 picks a free one (see ``port`` / ``base_url`` after ``start()``).
        api_key: Expected bearer key; ``None`` disables authentication.
        models: Model ids served by ``/v1/models`` and accepted by chat completions.
        reply: Reply policy: a callable ``(request_dict) -> str | Mapping`` (may be async), a constant text
            or mapping, or a sequence of scripted replies consumed in order (then echo).
            Default: ``EchoReply()``.
        first_token_delay_ms: Delay before the first byte of an answer (headers included unless
            ``early_headers``).
        inter_chunk_delay_ms: Delay between streamed content chunks.
        chars_per_chunk: Characters per content delta, or an inclusive ``(min, max)`` range drawn from a
            generator seeded with ``seed``.
        early_headers: Send streaming response headers at once; ``first_token_delay_ms`` then only delays the
            first SSE event.
        answer_field: Property of a ``json_schema`` answer that receives the reply text.
        idle_timeout_s: Close keep-alive connections idle for this long (``None``: never).
        history_limit: How many ``RecordedRequest`` to keep in ``requests``.
        seed: Seed for the chunk-size generator.
        speech_models: Model ids accepted by ``/v1/audio/speech`` (not listed by ``/v1/models``).
        speech_chunk_bytes: Bytes per chunk of a speech body (odd by default: chunks split frames).
        one_request_at_a_time: Serve model and chat requests one at a time, like llama.cpp's server: a
            request waits while another is in progress, and (with ``interrupt_streams``) a waiting
            request ends the running stream after its current chunk with ``[DONE]`` and no finish chunk.
            Combine with ``idle_timeout_s=5`` for a uvicorn-like server.
        interrupt_streams: See ``one_request_at_a_time`` (llama-cpp-python's ``interrupt_requests``).
        keep_alive_header: Announce ``idle_timeout_s`` in a ``Keep-Alive: timeout=N`` header (uvicorn, and
            so llama.cpp's Python server, announces nothing: set False to play them).
        response_formats: ``response_format`` types accepted (``None``: all); another one is refused as
            llama.cpp refuses ``json_schema``: HTTP 500 with a validation message naming response_format.
        embedding_models: Models accepted by ``/v1/embeddings`` -> their native dimension.
        embedding_backends: Model -> a backend computing its vectors (default for every model: the
            deterministic ``hashed_embedding``).
        embedding_delay_ms: Delay before an embeddings answer (a plan's ``first_token_delay_ms``
            overrides it per request).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = "sk-simulator",
        models: Sequence[str] = DEFAULT_MODELS,
        reply: ReplyPolicy | ReplyValue | Sequence[ReplyValue] | None = None,
        first_token_delay_ms: float = 0.0,
        inter_chunk_delay_ms: float = 0.0,
        chars_per_chunk: int | tuple[int, int] = 6,
        early_headers: bool = False,
        answer_field: str = "answer",
        idle_timeout_s: float | None = 75.0,
        history_limit: int = 1000,
        seed: int = 0,
        speech_models: Sequence[str] = DEFAULT_SPEECH_MODELS,
        speech_chunk_bytes: int = _DEFAULT_SPEECH_CHUNK_BYTES,
        one_request_at_a_time: bool = False,
        interrupt_streams: bool = True,
        response_formats: Sequence[str] | None = None,
        keep_alive_header: bool = True,
        embedding_models: Mapping[str, int] = DEFAULT_EMBEDDING_MODELS,
        embedding_backends: Mapping[str, EmbeddingBackend] | None = None,
        embedding_delay_ms: float = 0.0,
    ) -> None:
        if speech_chunk_bytes < 1:
            raise ValueError(f"speech_chunk_bytes must be positive, got {speech_chunk_bytes}")
        self.host = host
        self._requested_port = port
        self.api_key = api_key
        self.models: list[str] = list(models)
        self.reply_policy: ReplyPolicy = _as_policy(reply)
        self.first_token_delay_ms = first_token_delay_ms
        self.inter_chunk_delay_ms = inter_chunk_delay_ms
        self.chars_per_chunk = chars_per_chunk
        self.early_headers = early_headers
        self.answer_field = answer_field
        self.idle_timeout_s = idle_timeout_s
        self.speech_models: list[str] = list(speech_models)
        self.speech_chunk_bytes = speech_chunk_bytes
        self.embedding_models: dict[str, int] = dict(embedding_models)
        self.embedding_backends: dict[str, EmbeddingBackend] = dict(embedding_backends or {})
        self.embedding_delay_ms = embedding_delay_ms
        self.default_plan: RequestPlan | None = None
        self.one_request_at_a_time = one_request_at_a_time
        self.keep_alive_header = keep_alive_header
        self.interrupt_streams = interrupt_streams
        self.response_formats: tuple[str, ...] | None = (
            None if response_formats is None else tuple(response_formats)
        )
        #: Most model/chat requests that were being served at once.
        self.max_in_flight = 0
        #: Streams ended early because another request was waiting (``one_request_at_a_time``).
        self.streams_interrupted = 0
        self._in_flight = 0
        self._waiting = 0
        self._serial = asyncio.Lock()

        self.requests_by_path: collections.Counter[str] = collections.Counter()
        self.connections_accepted = 0
        self.requests: collections.deque[RecordedRequest] = collections.deque(maxlen=history_limit)

        self._plans: collections.deque[RequestPlan] = collections.deque()
        self._rng = random.Random(seed)
        self._server: asyncio.Server | None = None
        self._connections: dict[int, _Connection] = {}
        self._closing = False
        self._port: int | None = None
        self._seq = 0
        self._request_event = asyncio.Event()

    async def start(self) -> None:
        """Bind the listening socket and start serving.

        Raises:
            RuntimeError: If already started.
            OSError: If the port cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._closing = False
        # A listen backlog like production servers' (uvicorn: 2048): hundreds of calls connecting at
        # once must queue, not time out in SYN retries behind asyncio's default of 100.
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self._requested_port, limit=_MAX_HEAD_BYTES, backlog=2048
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.debug("openai simulator listening on %s", self.base_url)

    async def stop(self) -> None:
        """Stop listening and close every open connection (stalled ones included) promptly."""
        server, self._server = self._server, None
        self._closing = True
        if server is not None:
            server.close()
        await self._kill(list(self._connections.values()))
        if server is not None:
            await server.wait_closed()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        """The bound port (after ``start()``)."""
        if self._port is None:
            raise RuntimeError("simulator not started")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:<port>/v1`` — what to pass as an OpenAI client's ``base_url``."""
        return f"http://{self.host}:{self.port}/v1"

    @property
    def open_connections(self) -> int:
        """Number of TCP connections currently open."""
        return len(self._connections)

    async def drop_connections(self, *, idle_only: bool = True) -> int:
        """Close connections from the server side (simulates a provider/LB dropping keep-alive sockets).

        Args:
            idle_only: Only close connections not in the middle of a request.

        Returns:
            How many connections were closed.
        """
        victims = [c for c in self._connections.values() if not (idle_only and c.busy)]
        await self._kill(victims)
        return len(victims)

    def plan_next(self, plan: RequestPlan, *, times: int = 1) -> None:
        """Queue ``plan`` for the next ``times`` requests matching ``plan.path`` (FIFO)."""
        self._plans.extend([plan] * times)

    def inject(
        self,
        fault: Fault,
        *,
        times: int = 1,
        retry_after: float | None = None,
        after_chunks: int | None = None,
        graceful: bool = False,
        stall_s: float | None = None,
        message: str | None = None,
        path: str | None = CHAT_COMPLETIONS_PATH,
        first_token_delay_ms: float | None = None,
        inter_chunk_delay_ms: float | None = None,
        chars_per_chunk: int | tuple[int, int] | None = None,
    ) -> RequestPlan:
        """Queue ``fault`` for the next ``times`` matching requests; see ``RequestPlan`` for the arguments.

        Returns:
            The queued plan.
        """
        plan = RequestPlan(
            fault=fault,
            path=path,
            retry_after=retry_after,
            after_chunks=after_chunks,
            graceful=graceful,
            stall_s=stall_s,
            message=message,
            first_token_delay_ms=first_token_delay_ms,
            inter_chunk_delay_ms=inter_chunk_delay_ms,
            chars_per_chunk=chars_per_chunk,
        )
        self.plan_next(plan, times=times)
        return plan

    def set_default_plan(self, plan: RequestPlan | None) -> None:
        """Apply ``plan`` to every matching request that has no queued plan (``None`` turns it off)."""
        self.default_plan = plan

    def set_default_fault(self, fault: Fault | None, **kwargs: Any) -> None:
        """Default-for-all mode: inject ``fault`` into every matching request until called with ``None``.

        Args:
            fault: The fault, or ``None`` to go back to normal answers.
            **kwargs: Other ``RequestPlan`` fields (``retry_after``, ``path``...).
        """
        self.default_plan = None if fault is None else RequestPlan(fault=fault, **kwargs)

    def clear_plans(self) -> None:
        """Drop queued plans and the default plan."""
        self._plans.clear()
        self.default_plan = None

    @property
    def pending_plans(self) -> int:
        """Number of queued (not yet consumed) plans."""
        return len(self._plans)

    def script(self, *replies: ReplyValue, fallback: ReplyPolicy | None = None) -> ScriptedReplies:
        """Replace the reply policy with scripted replies consumed in order (then ``fallback`` / echo)."""
        policy = ScriptedReplies(replies, fallback=fallback)
        self.reply_policy = policy
        return policy

    def _take_plan(self, path: str) -> RequestPlan | None:
        for i, plan in enumerate(self._plans):
            if plan.matches(path):
                del self._plans[i]
                return plan
        if self.default_plan is not None and self.default_plan.matches(path):
            return self.default_plan
        return None

    @property
    def last_request(self) -> RecordedRequest | None:
        """The most recent request, or ``None``."""
        return self.requests[-1] if self.requests else None

    @property
    def last_request_json(self) -> Any:
        """The most recent request body parsed as JSON (``None`` if absent or not JSON)."""
        last = self.last_request
        return last.json() if last is not None else None

    @property
    def last_request_headers(self) -> dict[str, str]:
        """Headers (lower-case names) of the most recent request (empty when none)."""
        last = self.last_request
        return dict(last.headers) if last is not None else {}

    def request_count(self, path: str | None = None) -> int:
        """Requests received on ``path`` (all paths when ``None``)."""
        return sum(self.requests_by_path.values()) if path is None else self.requests_by_path[path]

    async def wait_for_requests(self, count: int = 1, *, path: str | None = None) -> None:
        """Wait until at least ``count`` requests were received on ``path`` (any path when ``None``).

        Bound the wait with ``asyncio.timeout(...)`` around the call.
        """
        while self.request_count(path) < count:
            self._request_event.clear()
            await self._request_event.wait()

    def reset_counters(self) -> None:
        """Zero the request/connection counters and forget the request history."""
        self.requests_by_path.clear()
        self.requests.clear()
        self.connections_accepted = 0

    def stats(self) -> dict[str, Any]:
        """JSON-friendly snapshot of the counters."""
        return {
            "connections_accepted": self.connections_accepted,
            "open_connections": self.open_connections,
            "requests_by_path": dict(self.requests_by_path),
            "pending_plans": self.pending_plans,
        }

    def _authorized(self, req: _Request) -> tuple[bool, str]:
        if self.api_key is None:
            return True, ""
        auth = req.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token == self.api_key:
            return True, ""
        if not token:
            return False, (
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). (voxcore simulator)"
            )
        return False, f"Incorrect API key provided: {_mask_key(token)}. (voxcore simulator)"

    async def _dispatch(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        if req.path.startswith(ADMIN_PREFIX):
            return await self._admin(req, writer)
        ok, why = self._authorized(req)
        if not ok:
            return await self._send_error(writer, req, 401, why, "invalid_request_error", "invalid_api_key")
        path = req.path.rstrip("/") or "/"
        method = "GET" if req.method == "HEAD" else req.method
        model_id: str | None = None
        if method == "GET" and path == MODELS_PATH:
            route = "models"
        elif method == "GET" and path.startswith(MODELS_PATH + "/"):
            route, model_id = "model", path[len(MODELS_PATH) + 1 :]
        elif method == "POST" and path == CHAT_COMPLETIONS_PATH:
            route = "chat"
        elif method == "POST" and path == AUDIO_SPEECH_PATH:
            route = "speech"
        elif method == "POST" and path == EMBEDDINGS_PATH:
            route = "embeddings"
        else:
            message = f"Invalid URL ({req.method} {req.path})"
            return await self._send_error(writer, req, 404, message, "invalid_request_error", None)
        if route == "speech":
            return await self._route(route, model_id, path, req, reader, writer)
        if self.one_request_at_a_time:
            self._waiting += 1
            try:
                await self._serial.acquire()
            finally:
                self._waiting -= 1
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return await self._route(route, model_id, path, req, reader, writer)
        finally:
            self._in_flight -= 1
            if self.one_request_at_a_time:
                self._serial.release()

    async def _route(
        self,
        route: str,
        model_id: str | None,
        path: str,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        plan = self._take_plan(path)
        fault = plan.fault if plan is not None else None
        if plan is not None and fault in _STATUS_FAULTS:
            return await self._send_status_fault(writer, req, plan)
        if fault is Fault.TIMEOUT and plan is not None:
            await self._stall(reader, plan.stall_s)
            return False

        if route == "models":
            data = [self._model_object(m) for m in self.models]
            listing = {"object": "list", "data": data}
            return await self._send_json_with_fault(reader, writer, req, listing, plan)
        if route == "model":
            assert model_id is not None
            if model_id not in self.models:
                return await self._send_error(
                    writer,
                    req,
                    404,
                    f"The model '{model_id}' does not exist",
                    "invalid_request_error",
                    "model_not_found",
                    "model",
                )
            return await self._send_json_with_fault(reader, writer, req, self._model_object(model_id), plan)
        if route == "speech":
            return await self._speech(req, reader, writer, plan)
        if route == "embeddings":
            return await self._embeddings(req, reader, writer, plan)
        return await self._chat(req, reader, writer, plan)

    def _model_object(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": _MODEL_CREATED, "owned_by": OWNED_BY}

    async def _send_status_fault(
        self, writer: asyncio.StreamWriter, req: _Request, plan: RequestPlan
    ) -> bool:
        fault = plan.fault
        model = "gpt-4o-mini"
        parsed = _json_or_none(req.body)
        if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
            model = parsed["model"]
        if fault is Fault.BAD_KEY:
            key = req.headers.get("authorization", "").partition(" ")[2].strip() or "<none>"
            message = plan.message or f"Incorrect API key provided: {_mask_key(key)}. (voxcore simulator)"
            kind, code = "invalid_request_error", "invalid_api_key"
            return await self._send_error(writer, req, 401, message, kind, code)
        if fault is Fault.UNKNOWN_MODEL:
            message = plan.message or f"The model `{model}` does not exist or you do not have access to it."
            kind, code = "invalid_request_error", "model_not_found"
            return await self._send_error(writer, req, 404, message, kind, code)
        if fault is Fault.RATE_LIMIT:
            retry = 1.0 if plan.retry_after is None else plan.retry_after
            message = plan.message or (
                f"Rate limit reached for {model} in organization {OWNED_BY} on requests per min (RPM): "
                f"Limit 500, Used 500, Requested 1. Please try again in {retry:g}s. (voxcore simulator)"
            )
            headers = [
                *_retry_after_headers(retry),
                ("x-ratelimit-limit-requests", "500"),
                ("x-ratelimit-limit-tokens", "200000"),
                ("x-ratelimit-remaining-requests", "0"),
                ("x-ratelimit-remaining-tokens", "199000"),
                ("x-ratelimit-reset-requests", f"{retry:g}s"),
                ("x-ratelimit-reset-tokens", "0s"),
            ]
            return await self._send_error(
                writer, req, 429, message, "requests", "rate_limit_exceeded", extra_headers=headers
            )
        if fault is Fault.SERVER_ERROR:
            message = plan.message or (
                "The server had an error while processing your request. Sorry about that! (voxcore simulator)"
            )
            return await self._send_error(writer, req, 500, message, "server_error", None)
        message = plan.message or (
            "The engine is currently overloaded, please try again later. (voxcore simulator)"
        )
        headers = _retry_after_headers(plan.retry_after) if plan.retry_after is not None else []
        return await self._send_error(writer, req, 503, message, "server_error", None, extra_headers=headers)

    async def _admin(self, req: _Request, writer: asyncio.StreamWriter) -> bool:
        """Tiny control API for out-of-process users of the standalone simulator."""
        action = req.path[len(ADMIN_PREFIX) :].strip("/")
        if req.method == "GET" and action == "stats":
            await self._send_json(writer, req, 200, self.stats(), keep_alive=req.keep_alive)
            return req.keep_alive
        if req.method == "POST" and action == "plan":
            try:
                data = json.loads(req.body or b"{}")
                if not isinstance(data, dict):
                    raise ValueError("plan must be a JSON object")
                times = int(data.pop("times", 1))
                default = bool(data.pop("default", False))
                plan = RequestPlan.from_dict(data)
            except (ValueError, TypeError) as err:
                return await self._send_error(writer, req, 400, str(err), "invalid_request_error", None)
            if default:
                self.set_default_plan(plan)
            else:
                self.plan_next(plan, times=times)
            payload = {"queued": times if not default else 0, "pending_plans": self.pending_plans}
            await self._send_json(writer, req, 200, payload, keep_alive=req.keep_alive)
            return req.keep_alive
        if req.method == "POST" and action == "reset":
            self.clear_plans()
            self.reset_counters()
            await self._send_json(writer, req, 200, {"reset": True}, keep_alive=req.keep_alive)
            return req.keep_alive
        message = f"Invalid URL ({req.method} {req.path})"
        return await self._send_error(writer, req, 404, message, "invalid_request_error", None)

    async def _embeddings(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plan: RequestPlan | None,
    ) -> bool:
        models = self.embedding_models
        body = await self._valid_body(req, writer, lambda b: validate_embeddings(b, models))
        if isinstance(body, bool):
            return body
        backend = self.embedding_backends.get(body["model"]) or default_backend()
        try:
            payload = embeddings_payload(body, models, backend)
        except Exception as err:
            log.exception("openai simulator: embedding backend failed")
            message = f"embedding backend failed: {err}"
            return await self._send_error(writer, req, 500, message, "server_error", None)
        delay = self.embedding_delay_ms
        if plan is not None and plan.first_token_delay_ms is not None:
            delay = plan.first_token_delay_ms
        if delay > 0:
            await asyncio.sleep(delay / 1000)
        return await self._send_json_with_fault(reader, writer, req, payload, plan)
