"""Regenerate the shipped Flux tables: `python -m loratui.memory.dev.flux_tables [NAME ...]`.

For each bundled architecture (FLUX.1-dev, FLUX.1-schnell, Chroma) this writes
`loratui/memory/arch_configs/flux_tables/NAME.json`: the parameter counts and the fitted step of every regime
the planner asks for with the default LoRA targets (16-bit or fp32 compute; bf16, fp8 or NF4 blocks; with and
without gradient checkpointing; LoRA in fp32 or bf16), traced on the meta device, plus the AE encoding fit.
Configs only; no weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from loratui.memory import flux
from loratui.memory.regime import Regime

OUT = Path(__file__).resolve().parents[1] / "arch_configs" / "flux_tables"


def regimes() -> list[Regime]:
    out = []
    for sixteen in (True, False):
        for dtype in ("bf16", "fp8", "nf4"):
            precision = "amp16" if sixteen else "fp32"
            network = "fp8-base" if dtype == "fp8" else "lora"
            if dtype == "nf4":
                precision = "qlora16" if sixteen else "qlora32"
            for checkpointing in (True, False):
                out.append(Regime(precision, checkpointing, False, None, network))
    return out


def build(name: str) -> dict:
    family = "chroma" if name == "chroma" else "flux"
    spec = flux.FluxSpec(family, name, flux.bundled_flux_configs(name), f"bundled:{name}")
    entries = {"summary": flux.calibrate_summary(spec)}
    for regime in regimes():
        for lora_dtype in ("fp32", "bf16"):
            key = flux.fit_key(regime, lora_dtype, "meta")
            entries[key] = flux.calibrate_flux(spec, regime, lora_dtype, "meta")
            print(name, key, flush=True)
    entries["vae|meta"] = flux.calibrate_vae(spec, "meta")
    return {
        "name": name,
        "fingerprint": spec.fingerprint,
        "version": flux.FLUX_FIT_VERSION,
        "entries": entries,
    }


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or list(flux.BUNDLED)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        table = build(name)
        (OUT / f"{name}.json").write_text(json.dumps(table, separators=(",", ":")) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
