"""Byte sizes: parsing and formatting."""

from __future__ import annotations

import pytest

from loratui.util.sizes import SizeError, format_bytes, parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("3GiB", 3 * 2**30),
        ("8GB", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("24", 24 * 2**30),
        ("100kb", 100_000),
        ("2TiB", 2 * 2**40),
        ("5000", 5000),
        (12, 12 * 2**30),
    ],
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "3 parsecs", "-1GB", "0", "1e9", True])
def test_parse_size_rejects(bad) -> None:
    with pytest.raises(SizeError):
        parse_size(bad)


def test_format_bytes() -> None:
    assert format_bytes(3 * 2**30) == "3.00 GiB"
    assert format_bytes(512 * 2**20) == "512.0 MiB"
    assert format_bytes(100) == "100 B"
    assert format_bytes(-(2**30), signed=True) == "-1.00 GiB"
    assert format_bytes(2**20, signed=True) == "+1.0 MiB"


def test_format_bytes_short_and_unknown() -> None:
    assert format_bytes(1536 * 2**20, short=True) == "1.5 GiB"
    assert format_bytes(7.41 * 2**30, short=True) == "7.4 GiB"
    assert format_bytes(512 * 2**20, short=True) == "512.0 MiB"
    assert format_bytes(12 * 2**10, short=True) == "12 KiB"
    assert format_bytes(12 * 2**10) == "12.0 KiB"
    assert format_bytes(-(2**30), short=True) == "-1.0 GiB"
    assert format_bytes(None) == "-"
    assert format_bytes(None, unknown="?") == "?"
