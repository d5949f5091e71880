"""Composition root (dependency-injector container), configuration loading, logging and the CLI."""
