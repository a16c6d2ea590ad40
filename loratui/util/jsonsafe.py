"""JSON from files a user hands in: a document nested too deeply is a `ValueError`, never a `RecursionError`."""

from __future__ import annotations

import json
from typing import Any

TOO_DEEP = "nests too deeply to be read (a damaged or hostile file)"


def loads(text: str | bytes, what: str = "the JSON") -> Any:
    """`json.loads`; raises `ValueError` ("WHAT nests too deeply ...") instead of `RecursionError`."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} {TOO_DEEP}") from None
