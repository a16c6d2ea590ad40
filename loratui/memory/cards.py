"""A small table of common GPUs (memory as the driver reports it), for `--card "RTX 4060"`."""

from __future__ import annotations

import difflib
import re

MIB = 2**20
#: name -> total memory in MiB (what nvidia-smi shows; slightly under the marketing size)
CARDS: dict[str, int] = {
    "GTX 1080 Ti": 11264,
    "GTX 1660": 6144,
    "RTX 2060": 6144,
    "RTX 2070": 8192,
    "RTX 2080 Ti": 11264,
    "RTX 3050": 8192,
    "RTX 3060": 12288,
    "RTX 3060 Laptop": 6144,
    "RTX 3060 Ti": 8192,
    "RTX 3070": 8192,
    "RTX 3080": 10240,
    "RTX 3080 12GB": 12288,
    "RTX 3090": 24576,
    "RTX 4060": 8188,
    "RTX 4060 Laptop": 8188,
    "RTX 4060 Ti": 8188,
    "RTX 4060 Ti 16GB": 16380,
    "RTX 4070": 12282,
    "RTX 4070 Ti Super": 16376,
    "RTX 4080": 16376,
    "RTX 4090": 24564,
    "RTX 5070": 12227,
    "RTX 5080": 16303,
    "RTX 5090": 32607,
    "RTX A4000": 16376,
    "RTX A5000": 24564,
    "RTX A6000": 49140,
    "RTX 6000 Ada": 49140,
    "T4": 15360,
    "V100": 16384,
    "V100 32GB": 32768,
    "A10G": 23028,
    "L4": 23034,
    "L40S": 46068,
    "A100 40GB": 40960,
    "A100 80GB": 81920,
    "H100": 81559,
    "H200": 143771,
}


class UnknownCard(ValueError):
    """A card name not in the table; the message suggests close names."""


def _norm(name: str) -> str:
    text = re.sub(r"\b(nvidia|geforce|tesla)\b", "", name.lower())
    return re.sub(r"[^a-z0-9]", "", text)


def card_memory(name: str) -> tuple[str, int]:
    """(canonical name, total bytes) of a known card; `UnknownCard` with suggestions otherwise."""
    wanted = _norm(name)
    for known, mib in CARDS.items():
        if _norm(known) == wanted:
            return known, mib * MIB
    names = {_norm(c): c for c in CARDS}
    close = difflib.get_close_matches(wanted, list(names), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(repr(names[c]) for c in close)}?" if close else "or give --vram 12GB"
    raise UnknownCard(f"unknown card {name!r}; {hint} (known: `loratui recommend --card list`)")
