"""Test support a host's suite can reuse: real Redis servers and the simulator as pytest fixtures."""
