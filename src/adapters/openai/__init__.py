"""OpenAI-compatible HTTP adapters: warm connection manager, streaming structured client, tokenizers, TTS."""

from voxcore.adapters.openai.client import OpenAILLMClient
from voxcore.adapters.openai.config import OpenAIConfig
from voxcore.adapters.openai.connection import OpenAIConnectionManager, connection_reused, shared_ssl_context
from voxcore.adapters.openai.tokenizer import HeuristicTokenizer, TiktokenTokenizer, make_tokenizer
from voxcore.adapters.openai.tts import OpenAITTSEngine

__all__ = [
    "HeuristicTokenizer",
    "OpenAIConfig",
    "OpenAIConnectionManager",
    "OpenAILLMClient",
    "OpenAITTSEngine",
    "TiktokenTokenizer",
    "connection_reused",
    "make_tokenizer",
    "shared_ssl_context",
]
