"""Regenerate the shipped memory tables: `python -m loratui.memory.dev.calibrate [NAME ...]`.

For SD1.5, SD2.x, SDXL, Llama-2-7B/13B, Llama-3.1-8B, TinyLlama-1.1B and the LLM presets' reference models
(Llama-3.2-3B, Qwen2.5-14B, Qwen2.5-32B, Llama-3.1-70B) this builds the model on the meta device, summarises its parameters, traces the reference training step over the calibration design
for every regime the estimator can ask for, and writes `arch_configs/tables/NAME.json`. Takes minutes per SD
architecture on a laptop CPU; nothing is downloaded and no weights are read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import product
from pathlib import Path

from loratui.memory.arch import ArchSpec, bundled_llm_config, bundled_sd_configs
from loratui.memory.fit import FIT_VERSION, calibrate_llm, calibrate_sd
from loratui.memory.regime import Regime
from loratui.memory.tables import _versions, fit_key

SD_NAMES = ("sd15", "sd2", "sdxl")
LLM_NAMES = (
    "llama-2-7b",
    "llama-2-13b",
    "llama-3.1-8b",
    "tinyllama-1.1b",
    # the preset classes' reference models (docs/presets.md): 1-3B, 12-14B, 30-34B, 70B
    "llama-3.2-3b",
    "qwen2.5-14b",
    "qwen2.5-32b",
    "llama-3.1-70b",
)
TABLE_DIR = Path(__file__).resolve().parent.parent / "arch_configs" / "tables"


def spec_for(name: str) -> ArchSpec:
    if name in SD_NAMES:
        return ArchSpec("sd", name, bundled_sd_configs(name), f"bundled:{name}")
    return ArchSpec("llm", "llm", {"model": bundled_llm_config(name)}, f"bundled:{name}")


def regimes(kind: str) -> list[Regime]:
    if kind == "sd":
        return [Regime(p, c, d) for p, c, d in product(("amp16", "fp32"), (False, True), (False, True))]
    # an LLM's default targets are estimated as all-linear (the same layers, `memory.estimate.regime_for`)
    targets = (("all-linear",),)
    fp32_lora = [
        Regime(p, c, d, t, chunked_loss=chunked)
        for p, c, d, t, chunked in product(
            ("amp16", "qlora16", "qlora32", "fp32"), (False, True), (False, True), targets, (False, True)
        )
    ]
    # `lora_dtype: bf16` where it is used: with 16-bit compute on a GPU (16-bit LoRA and QLoRA)
    bf16_lora = [
        Regime(p, c, d, t, chunked_loss=chunked, lora_dtype="bf16")
        for p, c, d, t, chunked in product(
            ("amp16", "qlora16"), (False, True), (False, True), targets, (False, True)
        )
    ]
    return fp32_lora + bf16_lora


def build_table(name: str, log=print, keep: dict | None = None) -> dict:
    from loratui.memory.summary import build_summary
    from loratui.models.sd.loading import quiet_libraries

    spec = spec_for(name)
    started = time.time()
    summary = build_summary(spec)
    fits = {}
    with quiet_libraries():
        for regime in regimes(spec.kind):
            kept = [fit_key(spec, regime, "meta", w) for w in ("step", "text_training")]
            if keep and kept[0] in keep.get("fits", {}):
                fits.update({k: keep["fits"][k] for k in kept if k in keep["fits"]})
                continue
            if spec.kind == "llm":
                fits[fit_key(spec, regime, "meta", "step")] = calibrate_llm(spec, regime, "meta").to_dict()
            else:
                fits[fit_key(spec, regime, "meta", "step")] = calibrate_sd(
                    spec, regime, "meta", "unet"
                ).to_dict()
                fits[fit_key(spec, regime, "meta", "text_training")] = calibrate_sd(
                    spec, regime, "meta", "text_training"
                ).to_dict()
            log(f"{name}: {regime.key()} done ({time.time() - started:.0f}s)")
        if spec.kind == "sd":
            for precision, what in product(("amp16", "fp32"), ("vae", "text")):
                regime = Regime(precision)
                fits[fit_key(spec, regime, "meta", what)] = calibrate_sd(spec, regime, "meta", what).to_dict()
    return {
        "name": name,
        "fingerprint": spec.fingerprint,
        "family": spec.family,
        "summary": summary.to_dict(),
        "fits": fits,
        "generated_with": {
            "fit_version": FIT_VERSION[spec.kind],
            "versions": _versions(),
            "seconds": round(time.time() - started),
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=[*SD_NAMES, *LLM_NAMES])
    parser.add_argument(
        "--missing-only", action="store_true", help="keep the fits a table has; trace only regimes it lacks"
    )
    args = parser.parse_args(argv)
    TABLE_DIR.mkdir(parents=True, exist_ok=True)
    for name in args.names:
        path = TABLE_DIR / f"{name}.json"
        keep = json.loads(path.read_text("utf-8")) if args.missing_only and path.is_file() else None
        table = build_table(name, keep=keep)
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
