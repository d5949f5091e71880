"""Abstract ports that adapters implement and the application depends on."""
