"""Byte sizes: parse "3GiB" / "8GB" / "512MiB" and format byte counts for people."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")
GIB = 2**30
MIB = 2**20


class SizeError(ValueError):
    """A size string that cannot be read; the message shows accepted forms."""


def parse_size(text: str | int | float, *, card: bool = False) -> int:
    """Bytes in `text`: "3GiB", "8GB", "512MiB", "1.5 GiB", "2e9" is not accepted.

    Decimal units (kB, MB, GB, TB) are powers of 1000, binary units (KiB, MiB, GiB, TiB) powers of 1024.
    A bare number is GiB when it is below 4096 (e.g. "24"), else bytes. `card`: the size of a graphics card,
    where "8GB" is what vendors print for 8 GiB (8192 MiB), so decimal units count as binary.
    """
    if isinstance(text, bool):
        raise SizeError(f"not a size: {text!r}")
    if isinstance(text, int | float):
        value, unit = float(text), ""
    else:
        match = _PATTERN.match(str(text))
        if not match:
            raise SizeError(f"not a size: {text!r} (use e.g. 8GB, 12GiB or 512MiB)")
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise SizeError(f"unknown unit {unit!r} in {text!r} (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
    if unit == "" and value < 4096:
        unit = "gib"
    if card and unit in ("k", "kb", "m", "mb", "g", "gb", "t", "tb"):
        unit = unit[0] + "ib"
    result = int(round(value * _UNITS[unit]))
    if result <= 0:
        raise SizeError(f"size must be positive: {text!r}")
    return result


#: decimals per unit: the precise form of the planner's messages, and the short form of GPU tables and the TUI
_DIGITS = {"TiB": 2, "GiB": 2, "MiB": 1, "KiB": 1}
_SHORT_DIGITS = {"TiB": 1, "GiB": 1, "MiB": 1, "KiB": 0}
_UNIT_SIZES = (("TiB", 2**40), ("GiB", GIB), ("MiB", MIB), ("KiB", 2**10))


def format_bytes(
    count: float | None, *, signed: bool = False, short: bool = False, unknown: str = "-"
) -> str:
    """'7.41 GiB', '512.0 MiB', '12.0 KiB', '100 B' (binary units, what NVML and PyTorch report).

    `signed`: '+' before positive counts. `short`: one decimal for GiB and TiB and none for KiB ('7.4 GiB',
    '12 KiB'). A count that is not a number (None: unknown) reads as `unknown`.
    """
    if not isinstance(count, int | float):
        return unknown
    sign = "-" if count < 0 else ("+" if signed else "")
    value = abs(float(count))
    digits = _SHORT_DIGITS if short else _DIGITS
    for unit, size in _UNIT_SIZES:
        if value >= size:
            return f"{sign}{value / size:.{digits[unit]}f} {unit}"
    return f"{sign}{int(value)} B"


def gib(count: float) -> float:
    """Bytes -> GiB as a float."""
    return float(count) / GIB
