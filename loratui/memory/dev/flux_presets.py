"""Choose the presets' `flux-dev` sections with the planner: `python -m loratui.memory.dev.flux_presets [--write]`.

For each VRAM tier the recommender's top option for a FLUX.1-dev LoRA at 1024² (rank 16, effective batch 4,
latents and text-encoder outputs cached, AdamW, bf16 base) on the tier's usable memory less 5 % (the margin
`tests/test_memory_presets.py` checks) becomes the section: it keeps the effective batch and picks the
quality-preserving changes first (checkpointing, micro-batch, 8-bit AdamW, block swap, fp8, NF4, rank,
resolution). Where nothing fits, the section is `unsupported` with the reason. `--write` rewrites the
`flux-dev` sections of `presets/*.yaml` (other sections are kept). Configs only; no weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from loratui.config.presets import load_preset, preset_names
from loratui.memory.integration import preset_family_config, tier_budget

FAMILY = "flux-dev"
MARGIN = 0.05
GIB = 2**30
PRESET_DIR = Path(__file__).resolve().parents[3] / "presets"
START = {
    "lora_rank": 16,
    "lora_alpha": 16,
    "batch_size": 4,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": False,
    "mixed_precision": "bf16",
    "optimizer": "adamw",
    "resolution": 1024,
    "cache_latents": True,
    "cache_text_encoder_outputs": True,
    "base_weights_dtype": "bf16",
    "blocks_to_swap": 0,
}
SECTION_KEYS = tuple(START)


def choose(vram_gb: float) -> tuple[dict[str, Any] | None, str]:
    """(section, why) for one tier; None when nothing fits (`why` then says why)."""
    from loratui.config import ResolvedConfig
    from loratui.memory.recommend import no_fit_message, recommend

    budget = int(tier_budget(vram_gb) / (1 + MARGIN))
    resolved = ResolvedConfig(preset_family_config(FAMILY, START), {}, "flux")
    found = recommend(resolved, budget, top=1)
    if not found:
        return None, _why_not(resolved, budget) or no_fit_message(resolved, budget)
    config = found[0].config
    section = {key: getattr(config, key) for key in SECTION_KEYS}
    section["lora_alpha"] = section["lora_rank"]
    return section, f"{found[0].estimate.total_bytes / GIB:.1f} GiB: {found[0].quality_note}"


def _why_not(resolved: Any, budget: int) -> str | None:
    """The reason when the T5-XXL caching pass is what does not fit, and what an fp8 T5 file would give."""
    from dataclasses import replace

    from loratui.memory.estimate import estimate_peak
    from loratui.memory.recommend import recommend

    smallest = estimate_peak(
        resolved.config.model_copy(
            update={"base_weights_dtype": "nf4", "blocks_to_swap": 36, "resolution": 512, "batch_size": 1}
        ).model_copy(update={"gradient_checkpointing": True, "gradient_accumulation_steps": 1})
    )
    if not smallest.phase.startswith("text-encoder caching"):
        return None
    fp8_t5 = resolved.config.model_copy(update={"t5xxl": "t5xxl_fp8_e4m3fn.safetensors"})
    found = recommend(replace(resolved, config=fp8_t5), budget, top=1)
    with_fp8 = (
        f"; with an fp8 T5 file (t5xxl: t5xxl_fp8_e4m3fn.safetensors) `--preset auto` finds "
        f"{', '.join(f'{k}={v}' for k, v in found[0].changes.items())} at "
        f"{found[0].estimate.total_bytes / GIB:.1f} GiB"
        if found
        else ""
    )
    return (
        f"caching the text-encoder outputs needs T5-XXL on the GPU: {smallest.total_bytes / GIB:.1f} GiB with a "
        f"16-bit T5, over the {budget / GIB:.1f} GiB usable (5 % kept free){with_fp8}; use 12gb"
    )


def plan() -> dict[str, tuple[dict[str, Any] | None, str]]:
    return {name: choose(load_preset(name).vram_gb) for name in preset_names()}


def write(planned: dict[str, tuple[dict[str, Any] | None, str]]) -> None:
    for name, (section, why) in planned.items():
        path = PRESET_DIR / f"{name}.yaml"
        text = path.read_text(encoding="utf-8")
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        data = yaml.safe_load(text)
        families = {k: v for k, v in (data.get("families") or {}).items() if k != FAMILY}
        unsupported = {k: v for k, v in (data.get("unsupported") or {}).items() if k != FAMILY}
        if section is not None:
            families[FAMILY] = section
        else:
            unsupported[FAMILY] = why
        data["families"] = families
        data.pop("unsupported", None)
        if unsupported:
            data["unsupported"] = unsupported
        path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", action="store_true", help="rewrite the flux-dev sections of presets/*.yaml"
    )
    args = parser.parse_args(argv)
    planned = plan()
    for name, (section, why) in planned.items():
        print(f"{name:<9} {FAMILY}: {section if section is not None else 'unsupported'} ({why})")
    if args.write:
        write(planned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
