"""Adapters: ports implemented on concrete technologies (Redis, OpenAI-compatible HTTP)."""
