"""The hexagon's inside: pure domain rules and the ports adapters implement."""
