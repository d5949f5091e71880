"""OpenAI-compatible HTTP adapters (LLM, TTS)."""
