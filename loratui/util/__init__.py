"""Small shared utilities, the lowest layer: nothing here imports the rest of loratui.

- `atomic`: atomic file and folder writes.
- `seeding`: seeds, data order and per-sample randomness (imports torch).
- `jsonsafe`: `loads` for user files: too-deep nesting is a `ValueError`, not a `RecursionError`.
- `sizes`: byte sizes: parse "3GiB" / "8GB", format byte counts ("7.41 GiB", or "7.4 GiB" short).
"""
