"""Chat completions of the simulator: validation, the reply rendered as JSON, JSON or SSE streaming."""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from voxcore.simulator.openai_server.plans import (
    _DEFAULT_AFTER_CHUNKS,
    MALFORMED_SSE_DATA,
    Fault,
    ReplyPolicy,
    ReplyValue,
    RequestPlan,
)
from voxcore.simulator.openai_server.replies import _text_of, approx_tokens, schema_example
from voxcore.simulator.openai_server.wire import _dumps, _HttpServer, _Request, _sse, _Timing

log = logging.getLogger("voxcore.simulator.openai_server")


@dataclass(slots=True)
class _ChatCtx:
    id: str
    created: int
    model: str
    include_usage: bool
    usage: dict[str, Any] = field(default_factory=dict)


class _ChatRoutes(_HttpServer):
    """``POST /v1/chat/completions`` of :class:`OpenAISimulator` (streamed or not, with injected faults)."""

    # Set up by OpenAISimulator.__init__.
    models: list[str]
    reply_policy: ReplyPolicy
    answer_field: str
    early_headers: bool
    one_request_at_a_time: bool
    interrupt_streams: bool
    response_formats: tuple[str, ...] | None
    streams_interrupted: int
    _waiting: int
    _rng: random.Random

    def _split(self, text: str, chars_per_chunk: int | tuple[int, int]) -> list[str]:
        pieces: list[str] = []
        i = 0
        while i < len(text):
            n = chars_per_chunk if isinstance(chars_per_chunk, int) else self._rng.randint(*chars_per_chunk)
            n = max(1, n)
            pieces.append(text[i : i + n])
            i += n
        return pieces

    def _validate_chat(self, body: Any) -> tuple[int, str, str | None, str | None] | None:
        """Return ``(status, message, param, code)`` for an invalid chat request, else ``None``."""
        if not isinstance(body, dict):
            return 400, "Invalid type for request body: expected an object.", None, "invalid_type"
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return 400, "you must provide a model parameter", "model", None
        messages = body.get("messages")
        if messages is None:
            return 400, "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        if not isinstance(messages, list) or not messages:
            return 400, "Invalid 'messages': expected a non-empty array.", "messages", "invalid_value"
        if not all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages):
            return 400, "Invalid 'messages': every message needs a 'role'.", "messages", "invalid_value"
        rf = body.get("response_format")
        if rf is not None:
            kind = rf.get("type") if isinstance(rf, dict) else None
            if kind not in ("text", "json_object", "json_schema"):
                return 400, "Invalid 'response_format.type'.", "response_format.type", "invalid_value"
            if self.response_formats is not None and kind not in self.response_formats:
                allowed = " or ".join(f"'{k}'" for k in self.response_formats)
                message = (
                    "1 validation error for CreateChatCompletionRequest: response_format.type: "
                    f"Input should be {allowed} [type=literal_error, input_value={kind!r}]"
                )
                return 500, message, "response_format.type", None
            if kind == "json_schema":
                spec = rf.get("json_schema")
                if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                    return (
                        400,
                        "Missing required parameter: 'response_format.json_schema'.",
                        "response_format.json_schema",
                        "missing_required_parameter",
                    )
        if model not in self.models:
            msg = f"The model `{model}` does not exist or you do not have access to it."
            return 404, msg, None, "model_not_found"
        return None

    def _render(self, reply: ReplyValue, body: dict[str, Any]) -> tuple[str, bool]:
        """Turn a reply into message content; returns ``(content, is_structured)``."""
        rf = body.get("response_format")
        kind = rf.get("type") if isinstance(rf, dict) else None
        if isinstance(reply, Mapping):
            return _dumps(dict(reply)), True
        if kind == "json_schema" and isinstance(rf, dict):
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            obj = schema_example(schema or {}, answer=reply, answer_field=self.answer_field)
            return _dumps(obj), True
        if kind == "json_object":
            schema = rf.get("schema") if isinstance(rf, dict) else None
            if isinstance(schema, dict):
                return _dumps(schema_example(schema, answer=reply, answer_field=self.answer_field)), True
            return _dumps({self.answer_field: reply}), True
        return reply, False

    async def _reply(self, body: dict[str, Any], plan: RequestPlan | None) -> ReplyValue:
        if plan is not None and plan.reply is not None:
            return plan.reply
        result = self.reply_policy(body)
        if inspect.isawaitable(result):
            result = await result
        if not isinstance(result, str | Mapping):
            raise TypeError(f"reply policy returned {type(result).__name__}, expected str or Mapping")
        return result

    @staticmethod
    def _usage(body: dict[str, Any], content: str) -> dict[str, Any]:
        prompt = 3
        for message in body.get("messages", []):
            prompt += 4 + approx_tokens(_text_of(message.get("content")))
        completion = approx_tokens(content)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        }

    async def _chat(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plan: RequestPlan | None,
    ) -> bool:
        body = await self._valid_body(req, writer, self._validate_chat)
        if isinstance(body, bool):
            return body
        try:
            reply = await self._reply(body, plan)
        except Exception as err:
            log.exception("openai simulator: reply policy failed")
            message = f"simulator reply policy failed: {type(err).__name__}: {err}"
            return await self._send_error(writer, req, 500, message, "server_error", None)

        content, structured = self._render(reply, body)
        fault = plan.fault if plan is not None else None
        if fault is Fault.INVALID_JSON:
            content = (content[:-1] if content.endswith("}") else content) + ",}"
        if plan is not None:
            if plan.raw_newlines:
                content = content.replace("\\n", "\n")
            if plan.fence:
                content = f"```json\n{content}\n```"
            if plan.trailing_text:
                content += plan.trailing_text
        finish_reason = "stop"
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        if isinstance(max_tokens, int) and max_tokens > 0 and approx_tokens(content) > max_tokens:
            content = content[: max_tokens * 4]
            finish_reason = "length"
        self._seq += 1
        stream_options = body.get("stream_options")
        ctx = _ChatCtx(
            id=f"chatcmpl-sim{self._seq:020d}",
            created=int(time.time()),
            model=body["model"],
            include_usage=isinstance(stream_options, dict) and stream_options.get("include_usage") is True,
            usage=self._usage(body, content),
        )
        timing = self._timing(plan)
        pieces = self._split(content, timing.chars_per_chunk)
        if body.get("stream") is True:
            return await self._stream(req, reader, writer, plan, ctx, pieces, finish_reason, timing)

        delay_ms = timing.first_token_delay_ms + timing.inter_chunk_delay_ms * max(0, len(pieces) - 1)
        if delay_ms > 0:
            await asyncio.sleep(delay_ms / 1000)
        payload = {
            "id": ctx.id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": ctx.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                    "logprobs": None,
                    "finish_reason": finish_reason,
                }
            ],
            "usage": ctx.usage,
            "service_tier": "default",
            "system_fingerprint": "fp_simulator",
        }
        return await self._send_json_with_fault(reader, writer, req, payload, plan)

    def _chunk(self, ctx: _ChatCtx, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        payload: dict[str, Any] = {
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": ctx.model,
            "service_tier": "default",
            "system_fingerprint": "fp_simulator",
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if ctx.include_usage:
            payload["usage"] = None
        return _sse(payload)

    async def _stream(
        self,
        req: _Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        plan: RequestPlan | None,
        ctx: _ChatCtx,
        pieces: list[str],
        finish_reason: str,
        timing: _Timing,
    ) -> bool:
        fault = plan.fault if plan is not None else None
        out, keep_alive = await self._open_stream(
            writer,
            req,
            [("Content-Type", "text/event-stream; charset=utf-8"), ("Cache-Control", "no-cache")],
            fault=fault,
            first_byte_delay_ms=timing.first_token_delay_ms,
        )
        await out.send(self._chunk(ctx, {"role": "assistant", "content": ""}, None))

        after = 0
        if plan is not None and fault in _DEFAULT_AFTER_CHUNKS:
            after = _DEFAULT_AFTER_CHUNKS[fault] if plan.after_chunks is None else max(0, plan.after_chunks)
        if fault is Fault.TRUNCATED:
            after = min(after, max(0, len(pieces) - 1))  # never deliver the whole content
        for i, piece in enumerate(pieces):
            if fault is not None and i == after:
                if fault is Fault.STALL:
                    await self._stall(reader, plan.stall_s if plan is not None else None)
                    return False
                if fault is Fault.TRUNCATED:
                    if plan is not None and plan.graceful:
                        await out.finish()
                    return False
                if fault is Fault.MALFORMED:
                    await out.send(_sse(MALFORMED_SSE_DATA))
            if i > 0 and timing.inter_chunk_delay_ms > 0:
                await asyncio.sleep(timing.inter_chunk_delay_ms / 1000)
            await out.send(self._chunk(ctx, {"content": piece}, None))
            if self.one_request_at_a_time and self.interrupt_streams and self._waiting:
                # llama-cpp-python: another request is waiting for the model, so this stream ends here.
                self.streams_interrupted += 1
                await out.send(b"data: [DONE]\n\n")
                await out.finish()
                return keep_alive
        if fault is Fault.STALL:  # content shorter than after_chunks
            await self._stall(reader, plan.stall_s if plan is not None else None)
            return False
        if fault is Fault.TRUNCATED:
            if plan is not None and plan.graceful:
                await out.finish()
            return False
        if fault is Fault.MALFORMED and after >= len(pieces):
            await out.send(_sse(MALFORMED_SSE_DATA))
        tail = [self._chunk(ctx, {}, finish_reason)]
        if ctx.include_usage:
            usage_chunk = {
                "id": ctx.id,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": ctx.model,
                "service_tier": "default",
                "system_fingerprint": "fp_simulator",
                "choices": [],
                "usage": ctx.usage,
            }
            tail.append(_sse(usage_chunk))
        tail.append(b"data: [DONE]\n\n")
        await out.send(*tail)
        await out.finish()
        return keep_alive
