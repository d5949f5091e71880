"""Pure domain: data types and rules, with no I/O, clock or environment."""
