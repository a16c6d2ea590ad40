"""Tiny random-weight models saved as real model folders, for `loratui demo` and the test-suite.

Everything is generated offline from configs and a small text corpus bundled in this package
(``configs/``, ``corpus/``): nothing is downloaded. The folders keep the real architectures' layout
and module names (so LoRA targeting and kohya/PEFT name conversion behave as with real checkpoints)
but use tiny widths, so they build in about a second and run on a CPU. Each folder is labelled with
``LORATUI_TINY_MODEL.txt`` and carries a build marker (``loratui_tiny_model.json``).

Builders are deterministic for a given ``seed``, idempotent (an existing complete build with the same
settings is reused) and atomic (built in a temporary sibling folder, then renamed into place).
Importing this package is cheap; torch/transformers/diffusers are imported when a builder runs.
"""

from loratui.tiny_models.blip import build_tiny_blip
from loratui.tiny_models.common import LABEL_FILE, MARKER_FILE, is_tiny_model, read_marker
from loratui.tiny_models.flux import FLUX_VARIANTS, build_tiny_flux
from loratui.tiny_models.llama import build_tiny_llama
from loratui.tiny_models.llm_families import LLM_FAMILIES, build_tiny_llm
from loratui.tiny_models.sd import SD_FAMILIES, build_tiny_sd

__all__ = [
    "FLUX_VARIANTS",
    "LABEL_FILE",
    "LLM_FAMILIES",
    "MARKER_FILE",
    "SD_FAMILIES",
    "build_tiny_blip",
    "build_tiny_flux",
    "build_tiny_llama",
    "build_tiny_llm",
    "build_tiny_sd",
    "is_tiny_model",
    "read_marker",
]
