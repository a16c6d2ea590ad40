"""Deterministic randomness keyed by (seed, epoch, sample index).

The shuffle order depends only on (seed, epoch) and each sample's noise/timestep/augmentation only on
(seed, epoch, index), so splitting a batch into smaller micro-batches, resuming, or running on several
processes draws exactly the same random numbers for every sample.
"""

from __future__ import annotations

import hashlib
import random

import torch

_MASK = (1 << 63) - 1


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from several parts (independent of Python's hash randomisation)."""
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _MASK


def epoch_permutation(seed: int, epoch: int, n: int) -> list[int]:
    """The order in which the `n` samples are visited in `epoch`."""
    generator = torch.Generator().manual_seed(mix_seed(seed, "epoch", epoch))
    return torch.randperm(n, generator=generator).tolist()


def sample_generator(seed: int, epoch: int, index: int, purpose: str = "sample") -> torch.Generator:
    """A CPU generator for one sample's randomness in one epoch (`purpose` separates streams)."""
    return torch.Generator().manual_seed(mix_seed(seed, purpose, epoch, index))


def sample_random(seed: int, epoch: int, index: int, purpose: str) -> random.Random:
    """A Python `random.Random` for one sample (caption dropout, tag shuffle, flips)."""
    return random.Random(mix_seed(seed, purpose, epoch, index))


def set_global_seed(seed: int) -> None:
    """Seed torch and Python's global generators (used for LoRA weight initialisation)."""
    random.seed(seed)
    torch.manual_seed(seed)
