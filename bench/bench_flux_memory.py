"""FLUX.1-dev LoRA memory: the planner's predictions, the presets' smallest cards, and the peers' published claims.

    python bench/bench_flux_memory.py [--markdown]

1. Predicted peak for FLUX.1-dev at 512² and 1024² with a bf16, fp8 and NF4 base (batch 1, rank 16, AdamW,
   gradient checkpointing, latents and text-encoder outputs cached), and the smallest card of
   `loratui.memory.cards` each fits as it is and with the fewest `blocks_to_swap` that make it fit 12 / 16 GB.
2. Each preset's `flux-dev` section: settings, predicted peak, the tier it claims and the smallest card it fits.
3. What the peers publish (kohya sd-scripts, ai-toolkit, SimpleTuner, OneTrainer; sources below) beside the
   planner's prediction for loratui's trainer at the same settings, and whether loratui predicts a fit there.

Configs only (the shipped FLUX.1-dev architecture; nothing downloaded). Predictions are for a CUDA device:
tensors + CUDA context + cuBLAS workspace + allocator reserve (`loratui.memory.flux`).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Any

GIB = 2**30
COMMON = {
    "task_type": "image-generation",
    "model_family": "flux",
    "lora_rank": 16,
    "batch_size": 1,
    "gradient_checkpointing": True,
    "cache_latents": True,
    "cache_text_encoder_outputs": True,
    "optimizer": "adamw",
}
KOHYA = (
    "kohya-ss/sd-scripts README.md, sd3 branch at commit ddfb38e (section 'FLUX.1 LoRA training'; the text moved "
    "to docs/flux_train_network.md at 884fc8c): https://github.com/kohya-ss/sd-scripts/blob/"
    "ddfb38e5016878d7b946b63b2cfcd8b43c9aabc4/README.md"
)
KOHYA_DOC = (
    "kohya-ss/sd-scripts docs/flux_train_network.md at commit a125c10, '6.1 VRAM Usage Optimization': "
    "https://github.com/kohya-ss/sd-scripts/blob/a125c10852bfd9d44fa4e7e3aa46662d2e0a610f/docs/flux_train_network.md"
)
AI_TOOLKIT = (
    "ostris/ai-toolkit README.md, 'FLUX.1 Training / Requirements': https://github.com/ostris/ai-toolkit#flux1-"
    "training; its example config: https://github.com/ostris/ai-toolkit/blob/016777ac5dc5a2af6e7d067b6d7c21a69cca"
    "5973/config/examples/train_lora_flux_24gb.yaml"
)
SIMPLETUNER = (
    "bghira/SimpleTuner documentation/quickstart/FLUX.md at commit 0496be2, 'Hardware requirements': "
    "https://github.com/bghira/SimpleTuner/blob/0496be2d92af170dcd9901ece9b355bb0c52456b/documentation/"
    "quickstart/FLUX.md"
)
ONETRAINER = (
    "OneTrainer's announcement of RAM offloading (Nerogar, r/StableDiffusion, 2024-11-02): "
    "https://www.reddit.com/r/StableDiffusion/comments/1gi2w2e/"
)


@dataclass
class Claim:
    """One published memory claim, the settings it was made at, and loratui's nearest settings."""

    peer: str
    claim: str
    card_gb: float
    settings: dict[str, Any]
    source: str
    differs: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


CLAIMS = [
    Claim(
        "kohya sd-scripts",
        "24 GB: fp8 base, dim 4, 1024² batch 2, 8-bit AdamW, cached latents + TE outputs",
        24,
        {
            "base_weights_dtype": "fp8",
            "lora_rank": 4,
            "resolution": 1024,
            "batch_size": 2,
            "optimizer": "adamw8bit",
        },
        KOHYA,
    ),
    Claim(
        "kohya sd-scripts",
        "16 GB: the same with batch 1",
        16,
        {"base_weights_dtype": "fp8", "lora_rank": 4, "resolution": 1024, "optimizer": "adamw8bit"},
        KOHYA,
    ),
    Claim(
        "kohya sd-scripts",
        "12 GB: blocks_to_swap 16 and 8-bit AdamW (fp8 base)",
        12,
        {
            "base_weights_dtype": "fp8",
            "lora_rank": 4,
            "resolution": 1024,
            "optimizer": "adamw8bit",
            "blocks_to_swap": 16,
        },
        KOHYA,
    ),
    Claim(
        "kohya sd-scripts",
        "10 GB: 22 blocks swapped (fp8 base; fp8 T5 file below 10 GB)",
        10,
        {
            "base_weights_dtype": "fp8",
            "lora_rank": 4,
            "resolution": 1024,
            "optimizer": "adamw8bit",
            "blocks_to_swap": 22,
            "t5xxl": "t5xxl_fp8_e4m3fn.safetensors",
        },
        KOHYA,
    ),
    Claim(
        "kohya sd-scripts",
        "8 GB: 28 blocks swapped (fp8 base, fp8 T5 file)",
        8,
        {
            "base_weights_dtype": "fp8",
            "lora_rank": 4,
            "resolution": 1024,
            "optimizer": "adamw8bit",
            "blocks_to_swap": 28,
            "t5xxl": "t5xxl_fp8_e4m3fn.safetensors",
        },
        KOHYA_DOC,
    ),
    Claim(
        "ai-toolkit",
        "at least 24 GB (example config: 8-bit transformer, rank 16, batch 1, 512-1024² buckets, 8-bit AdamW, "
        "EMA, caption dropout 0.05 so T5 stays loaded)",
        24,
        {
            "base_weights_dtype": "fp8",
            "resolution": 1024,
            "optimizer": "adamw8bit",
            "ema_decay": 0.99,
            "caption_dropout": 0.05,
            "t5xxl": "t5xxl_fp8_e4m3fn.safetensors",
        },
        AI_TOOLKIT,
        differs="ai-toolkit quantises the transformer and T5 to 8-bit with optimum-quanto (qfloat8); loratui's "
        "nearest is fp8 e4m3 for both",
    ),
    Claim(
        "SimpleTuner",
        "a bit more than 30 GB, bf16 base, rank 16 (resolution not stated; 1024² assumed)",
        32,
        {"base_weights_dtype": "bf16", "resolution": 1024, "lora_dtype": "bf16"},
        SIMPLETUNER,
        differs="SimpleTuner keeps LoRA weights in bf16 (loratui: lora_dtype bf16 here)",
    ),
    Claim(
        "SimpleTuner",
        "a bit more than 18 GB, int8 base + bf16 LoRA, rank 16",
        20,
        {"base_weights_dtype": "fp8", "resolution": 1024, "lora_dtype": "bf16"},
        SIMPLETUNER,
        differs="int8 (quanto) there, fp8 e4m3 here: both 1 byte per weight",
    ),
    Claim(
        "SimpleTuner",
        "a bit more than 9 GB, NF4 base + bf16 LoRA, rank 16",
        10,
        {"base_weights_dtype": "nf4", "resolution": 1024, "lora_dtype": "bf16"},
        SIMPLETUNER,
        differs="resolution not stated (1024² here: activations 4.5 GiB, at 512² the 16-bit T5 caching pass, "
        "10.2 GiB, is the peak)",
    ),
    Claim(
        "OneTrainer",
        "6 GB at 512² (CPU-offloaded checkpointing + layer offload fraction)",
        6,
        {
            "base_weights_dtype": "fp8",
            "resolution": 512,
            "blocks_to_swap": 36,
            "optimizer": "adamw8bit",
            "t5xxl": "t5xxl_fp8_e4m3fn.safetensors",
        },
        ONETRAINER,
        differs="OneTrainer also offloads the checkpointed activations to RAM (not in loratui); its base and T5 "
        "dtypes are not stated: an fp8 base with the most blocks swapped (36: one of each kind stays) and an fp8 T5 file are loratui's "
        "leanest (NF4 is not: its weights stay on the device when blocks are swapped)",
    ),
]


def flux_config(**changes: Any):
    from loratui.config import TrainConfig

    return TrainConfig(**{**COMMON, **changes})


def predict(**changes: Any):
    from loratui.memory.estimate import estimate_peak

    return estimate_peak(flux_config(**changes), device="cuda")


def smallest_card(total_bytes: int) -> str:
    """The smallest card of the `--card` table on which `total_bytes` fits its usable memory."""
    from loratui.memory.cards import CARDS, MIB
    from loratui.memory.integration import usable_from_total

    fitting = [
        (mib, name) for name, mib in CARDS.items() if usable_from_total(mib * MIB, name).bytes >= total_bytes
    ]
    if not fitting:
        return "none listed"
    mib, name = min(fitting)
    return f"{name} ({mib / 1024:.0f} GiB)"


def fewest_swapped(changes: dict[str, Any], card_gb: float) -> str:
    """The fewest `blocks_to_swap` with which the settings fit a card of `card_gb` GiB."""
    from loratui.memory.flux import max_blocks_to_swap
    from loratui.memory.integration import usable_from_total

    usable = usable_from_total(int(card_gb * GIB), "").bytes
    for blocks in range(0, max_blocks_to_swap(19, 38) + 1):  # kohya's meaning of blocks_to_swap
        if predict(**changes, blocks_to_swap=blocks).total_bytes <= usable:
            return str(blocks)
    return "does not fit"


def prediction_rows() -> list[list[str]]:
    from loratui.memory.estimate import planner_for
    from loratui.memory.flux import transformer_bytes

    rows = []
    for resolution in (512, 1024):
        for dtype in ("bf16", "fp8", "nf4"):
            changes = {"resolution": resolution, "base_weights_dtype": dtype}
            estimate = predict(**changes)
            planner = planner_for(flux_config(**changes), "flux")
            resident = transformer_bytes(planner.summary, flux_config(**changes), 2)[0]
            acts = estimate.breakdown.get("activations")
            rows.append(
                [
                    f"{resolution}²",
                    dtype,
                    f"{estimate.total_bytes / GIB:.2f} GiB (±{estimate.error_band:.0%})",
                    f"{resident / GIB:.2f}",
                    f"{acts / GIB:.2f}" if acts is not None else "below the peak",
                    estimate.phase,
                    smallest_card(estimate.total_bytes),
                    fewest_swapped(changes, 16),
                    fewest_swapped(changes, 12),
                ]
            )
    return rows


def preset_rows() -> list[list[str]]:
    from loratui.config.presets import load_preset, preset_names
    from loratui.memory.estimate import estimate_peak
    from loratui.memory.integration import preset_family_config, tier_budget

    rows = []
    for name in preset_names():
        preset = load_preset(name)
        section = preset.families.get("flux-dev")
        if section is None:
            reason = preset.unsupported.get("flux-dev", "no section")
            rows.append([f"`{name}`", f"{preset.vram_gb:g} GB", "not supported", "-", "-", reason[:160]])
            continue
        estimate = estimate_peak(preset_family_config("flux-dev", section), device="cuda")
        settings = (
            f"{section['base_weights_dtype']} base, swap {section['blocks_to_swap']}, {section['resolution']}², "
            f"r{section['lora_rank']}, batch {section['batch_size']} x {section['gradient_accumulation_steps']}, "
            f"{section['optimizer']}, checkpointing {'on' if section['gradient_checkpointing'] else 'off'}"
        )
        budget = tier_budget(preset.vram_gb)
        rows.append(
            [
                f"`{name}`",
                f"{preset.vram_gb:g} GB",
                settings,
                f"{estimate.total_bytes / GIB:.2f} GiB ({estimate.total_bytes / budget:.0%} of usable)",
                smallest_card(estimate.total_bytes),
                "",
            ]
        )
    return rows


def claim_rows() -> list[list[str]]:
    from loratui.memory.integration import usable_from_total

    rows = []
    for claim in CLAIMS:
        settings = dict(claim.settings)
        note = f"; {claim.differs}" if claim.differs else ""
        estimate = predict(**settings)
        usable = usable_from_total(int(claim.card_gb * GIB), "").bytes
        verdict = "fits" if estimate.total_bytes <= usable else "does not fit"
        rows.append(
            [
                claim.peer,
                claim.claim,
                f"{estimate.total_bytes / GIB:.2f} GiB (±{estimate.error_band:.0%}), peak during {estimate.phase}",
                f"{verdict} in {claim.card_gb:g} GB ({usable / GIB:.1f} GiB usable){note}",
            ]
        )
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the docs' tables")
    parser.parse_args(argv)
    print("FLUX.1-dev, batch 1, rank 16, AdamW, checkpointing, cached latents and text-encoder outputs\n")
    print(
        table(
            [
                "resolution",
                "base",
                "predicted peak",
                "transformer GiB",
                "activations GiB",
                "peak during",
                "smallest card (as is)",
                "fewest blocks_to_swap for 16 GB",
                "for 12 GB",
            ],
            prediction_rows(),
        )
    )
    print("\nflux-dev preset sections\n")
    print(
        table(
            ["preset", "tier", "settings", "predicted peak", "smallest card it fits", "note"], preset_rows()
        )
    )
    print("\npeers' published claims and loratui's prediction at their settings\n")
    print(table(["peer", "published claim", "loratui predicted", "loratui's verdict"], claim_rows()))
    print("\nsources:")
    for source in dict.fromkeys(c.source for c in CLAIMS):
        print(f"- {source}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
