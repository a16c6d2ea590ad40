"""Script-style entry points kept for compatibility with existing workflows (``python -m loratui.tools.X``)."""
