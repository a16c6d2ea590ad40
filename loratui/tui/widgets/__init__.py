"""Widgets, one per file. Each takes its data as attributes set by its parent and posts messages up."""
