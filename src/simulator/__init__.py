"""Local simulators of paid providers (OpenAI-compatible), for tests, probes and the offline demo.

These are *simulators*: they speak the real wire protocol over real HTTP on 127.0.0.1 but produce
scripted answers. Nothing in the library's production path imports them.
"""

from voxcore.simulator.embeddings import EMBEDDINGS_PATH, hashed_embedding
from voxcore.simulator.openai_server import (
    AUDIO_SPEECH_PATH,
    CHAT_COMPLETIONS_PATH,
    DEFAULT_MODELS,
    EchoReply,
    Fault,
    OpenAISimulator,
    RecordedRequest,
    ReplyPolicy,
    ReplyValue,
    RequestPlan,
    ScriptedReplies,
    approx_tokens,
    schema_example,
    synthetic_speech,
)

__all__ = [
    "AUDIO_SPEECH_PATH",
    "CHAT_COMPLETIONS_PATH",
    "DEFAULT_MODELS",
    "EMBEDDINGS_PATH",
    "EchoReply",
    "Fault",
    "OpenAISimulator",
    "RecordedRequest",
    "ReplyPolicy",
    "ReplyValue",
    "RequestPlan",
    "ScriptedReplies",
    "approx_tokens",
    "hashed_embedding",
    "schema_example",
    "synthetic_speech",
]
