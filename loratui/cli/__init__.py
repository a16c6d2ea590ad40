"""Command-line interface. Every command module imports only light modules at top level."""
