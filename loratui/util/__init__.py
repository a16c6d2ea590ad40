"""Small shared utilities (no heavy imports)."""
