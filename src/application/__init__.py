"""Use cases built on the ports: they never import adapters."""
