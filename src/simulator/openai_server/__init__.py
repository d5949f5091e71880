"""OpenAI-compatible HTTP/1.1 server SIMULATOR on 127.0.0.1 (stdlib asyncio streams only).

Routes: ``GET /v1/models``, ``POST /v1/chat/completions`` (JSON or SSE), ``POST /v1/audio/speech``
(synthetic speech-like PCM streamed with chunked transfer) and ``POST /v1/embeddings`` (deterministic
vectors, or a real model; see ``voxcore.simulator.embeddings``).

Modules: ``plans`` (faults, request plans, recorded requests, paths), ``replies`` (reply policies and
schema examples), ``wire`` (HTTP/1.1 over asyncio streams), ``chat`` (chat completions, JSON or SSE),
``speech`` (synthetic speech and its route), ``server`` (:class:`OpenAISimulator`: lifecycle, plans,
history, routing, admin API).
"""

from voxcore.simulator.openai_server.plans import (
    ADMIN_PREFIX,
    AUDIO_SPEECH_PATH,
    CHAT_COMPLETIONS_PATH,
    DEFAULT_MODELS,
    MALFORMED_SSE_DATA,
    MODELS_PATH,
    OWNED_BY,
    Fault,
    RecordedRequest,
    ReplyPolicy,
    ReplyValue,
    RequestPlan,
)
from voxcore.simulator.openai_server.replies import EchoReply, ScriptedReplies, approx_tokens, schema_example
from voxcore.simulator.openai_server.server import OpenAISimulator
from voxcore.simulator.openai_server.speech import (
    DEFAULT_SPEECH_MODELS,
    SPEECH_MS_PER_CHAR,
    SPEECH_SAMPLE_RATE,
    SPEECH_VOICES,
    synthetic_speech,
)

__all__ = [
    "ADMIN_PREFIX",
    "AUDIO_SPEECH_PATH",
    "CHAT_COMPLETIONS_PATH",
    "DEFAULT_MODELS",
    "DEFAULT_SPEECH_MODELS",
    "MALFORMED_SSE_DATA",
    "MODELS_PATH",
    "OWNED_BY",
    "SPEECH_MS_PER_CHAR",
    "SPEECH_SAMPLE_RATE",
    "SPEECH_VOICES",
    "EchoReply",
    "Fault",
    "OpenAISimulator",
    "RecordedRequest",
    "ReplyPolicy",
    "ReplyValue",
    "RequestPlan",
    "ScriptedReplies",
    "approx_tokens",
    "schema_example",
    "synthetic_speech",
]
