"""`loratui demo`: end-to-end runs on tiny bundled models and data."""
