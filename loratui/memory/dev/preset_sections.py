"""Choose the presets' LLM sections with the planner: `python -m loratui.memory.dev.preset_sections [--write]`.

For each VRAM tier and LLM size class (`config.presets.LLM_SIZE_CLASSES`) this takes the most generous setting of
a fixed ladder (16-bit LoRA before QLoRA at the same sequence length; longer sequences, larger ranks and batches
first) whose predicted peak on the class's reference model (`integration.PRESET_ARCHS`) fits the tier with 5 %
to spare, as `tests/test_memory_presets.py` checks. Where nothing on the ladder fits, the recommender's top
option is used; where that finds nothing either, the section is `unsupported` with the reason. `--write`
rewrites the LLM sections of `presets/*.yaml` (other sections are kept); `--markdown` prints the tables of
docs/presets.md and docs/benchmarks.md from the files as they are. Configs only; no weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from loratui.config.presets import LLM_SIZE_CLASSES, load_preset, preset_names
from loratui.memory.integration import PRESET_ARCHS, preset_family_config, tier_budget

MARGIN = 0.05
GIB = 2**30
PRESET_DIR = Path(__file__).resolve().parents[3] / "presets"
SECTION_KEYS = (
    "lora_rank",
    "lora_alpha",
    "batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "mixed_precision",
    "optimizer",
    "max_seq_len",
    "load_in_4bit",
)


def section(quantized: bool, rank: int, seq: int, batch: int) -> dict[str, Any]:
    """One preset section: effective batch 16, checkpointing on; QLoRA with 8-bit AdamW."""
    return {
        "lora_rank": rank,
        "lora_alpha": 2 * rank,
        "batch_size": batch,
        "gradient_accumulation_steps": max(16 // batch, 1),
        "gradient_checkpointing": True,
        "mixed_precision": "auto" if quantized else "bf16",
        "optimizer": "adamw8bit" if quantized else "adamw",
        "max_seq_len": seq,
        "load_in_4bit": quantized,
    }


LADDER = [
    section(False, 64, 4096, 8),
    section(False, 32, 4096, 4),
    section(False, 32, 4096, 2),
    section(False, 32, 2048, 4),
    section(False, 16, 2048, 2),
    section(False, 16, 2048, 1),
    section(True, 32, 4096, 2),
    section(True, 32, 2048, 2),
    section(True, 16, 2048, 1),
    section(False, 16, 1024, 1),
    section(True, 16, 1024, 1),
    section(True, 16, 512, 1),
    section(True, 8, 256, 1),
]


def choose(family: str, vram_gb: float) -> tuple[dict[str, Any] | None, str]:
    """(section, why) for one class on one tier; section None means unsupported, `why` then says why."""
    from loratui.config import ResolvedConfig
    from loratui.memory.estimate import estimate_peak
    from loratui.memory.recommend import recommend

    budget = tier_budget(vram_gb)
    for candidate in LADDER:
        estimate = estimate_peak(preset_family_config(family, candidate))
        if estimate.total_bytes * (1 + MARGIN) <= budget:
            return candidate, f"{estimate.total_bytes / GIB:.1f} GiB"
    resolved = ResolvedConfig(preset_family_config(family, LADDER[-1]), {}, "llm")
    found = recommend(resolved, int(budget / (1 + MARGIN)), top=1)
    if found:
        config = found[0].config
        return {key: getattr(config, key) for key in SECTION_KEYS}, "recommender"
    leanest = estimate_peak(preset_family_config(family, LADDER[-1]))
    return None, (
        f"the leanest setting (QLoRA r8, seq 256, batch 1) on {PRESET_ARCHS[family]} is predicted at "
        f"{leanest.total_bytes / GIB:.1f} GiB, over the {budget / GIB:.1f} GiB usable on this tier"
    )


def _larger_tier(family: str, vram_gb: float, chosen: dict[tuple[str, float], Any]) -> str:
    bigger = [g for (f, g), value in sorted(chosen.items(), key=lambda kv: kv[0][1]) if f == family and value]
    for gb in bigger:
        if gb > vram_gb:
            return next(n for n in preset_names() if load_preset(n).vram_gb == gb)
    return "FSDP over several GPUs"


def plan() -> dict[str, dict[str, Any]]:
    """preset name -> {"families": {class: section}, "unsupported": {class: reason}}."""
    chosen: dict[tuple[str, float], Any] = {}
    reasons: dict[tuple[str, float], str] = {}
    tiers = {name: load_preset(name).vram_gb for name in preset_names()}
    for family, _ in LLM_SIZE_CLASSES:
        for gb in sorted(set(tiers.values())):
            chosen[(family, gb)], reasons[(family, gb)] = choose(family, gb)
    out: dict[str, dict[str, Any]] = {}
    for name, gb in tiers.items():
        entry: dict[str, Any] = {"families": {}, "unsupported": {}}
        for family, _ in LLM_SIZE_CLASSES:
            if chosen[(family, gb)] is not None:
                entry["families"][family] = chosen[(family, gb)]
            else:
                use = _larger_tier(family, gb, chosen)
                entry["unsupported"][family] = f"{reasons[(family, gb)]}; use {use}"
        out[name] = entry
    return out


def write(planned: dict[str, dict[str, Any]]) -> None:
    for name, entry in planned.items():
        path = PRESET_DIR / f"{name}.yaml"
        text = path.read_text(encoding="utf-8")
        header = "".join(line + "\n" for line in text.splitlines() if line.startswith("#"))
        data = yaml.safe_load(text)
        keep = {k: v for k, v in (data.get("families") or {}).items() if not k.startswith("llm")}
        data["families"] = {**keep, **entry["families"]}
        unsupported = {k: v for k, v in (data.get("unsupported") or {}).items() if not k.startswith("llm")}
        unsupported.update(entry["unsupported"])
        data.pop("unsupported", None)
        if unsupported:
            data["unsupported"] = unsupported
        path.write_text(header + yaml.safe_dump(data, sort_keys=False, width=100), encoding="utf-8")


def markdown_tables() -> str:
    """The docs' preset tables from the preset files as they are: LLM settings (docs/presets.md) and every
    section's predicted peak on its tier (docs/benchmarks.md)."""
    from loratui.config.presets import PRESET_FAMILIES
    from loratui.memory.integration import preset_predictions

    llm = [f for f in PRESET_FAMILIES if f.startswith("llm")]
    settings = ["| preset | card | " + " | ".join(llm) + " |", "|---|---|" + "---|" * len(llm)]
    peaks = [
        "| preset | usable | " + " | ".join(PRESET_FAMILIES) + " |",
        "|---|---|" + "---|" * len(PRESET_FAMILIES),
    ]
    for name in preset_names():
        preset = load_preset(name)
        cells = []
        for family in llm:
            values = preset.families.get(family)
            if values is None:
                cells.append("not supported")
                continue
            kind = "QLoRA" if values["load_in_4bit"] else "16-bit LoRA"
            cells.append(
                f"{kind}, r{values['lora_rank']}, seq {values['max_seq_len']}, batch {values['batch_size']} × "
                f"{values['gradient_accumulation_steps']}"
            )
        settings.append(f"| `{name}` | {preset.vram} | " + " | ".join(cells) + " |")
        budget = tier_budget(preset.vram_gb)
        rows = {row["family"]: row["predicted_peak_bytes"] for row in preset_predictions(preset)}
        predicted = [
            f"{rows[f] / GIB:.2f} GiB ({rows[f] / budget:.0%})" if f in rows else "not supported"
            for f in PRESET_FAMILIES
        ]
        peaks.append(f"| `{name}` | {budget / GIB:.2f} GiB | " + " | ".join(predicted) + " |")
    return "\n".join(settings) + "\n\n" + "\n".join(peaks)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="rewrite the LLM sections of presets/*.yaml")
    parser.add_argument("--markdown", action="store_true", help="print the docs' preset tables and stop")
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_tables())
        return 0
    planned = plan()
    for name, entry in planned.items():
        for family, values in entry["families"].items():
            kind = "QLoRA" if values["load_in_4bit"] else "16-bit"
            print(
                f"{name:<9} {family:<8} {kind} r{values['lora_rank']} seq {values['max_seq_len']} "
                f"batch {values['batch_size']} x {values['gradient_accumulation_steps']}"
            )
        for family, reason in entry["unsupported"].items():
            print(f"{name:<9} {family:<8} unsupported: {reason}")
    if args.write:
        write(planned)
    return 0


if __name__ == "__main__":
    sys.exit(main())
