"""The facade the CLI calls into the memory planner: usable memory, the dry-run prediction, `--preset auto`.

    from loratui.memory.integration import apply_auto_preset, dry_run_prediction, usable_memory

`usable_memory(gpu=, vram=, card=)` turns `--vram`, `--card` or a GPU's free memory into a budget;
`dry_run_prediction(resolved)` returns a JSON-ready dict (and `dry_run_lines(pred)` plain text lines);
`apply_auto_preset(resolved, usable_bytes)` returns the config with the planner's top option applied;
`preset_predictions(preset)` predicts a preset's tiers for `loratui presets`. The TUI's side is
`loratui.memory.facade`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from loratui.util.sizes import GIB, MIB, format_bytes

DRIVER_RESERVE = 400 * MIB  # memory a driver/display keeps on a card of a given size (hypothetical cards)
SAFETY_MARGIN = 0.03  # of the card's memory, kept free on top of the predicted peak
AUTO_SOURCE = "preset auto (memory planner)"


#: image-run options that change what is trained or how, listed in `--dry-run`'s options block with the memory
#: each one adds (the prediction minus the prediction with that option at its default): (config key, label).
#: A key the config does not have is skipped, so a line can be added here before its option exists.
IMAGE_OPTIONS: tuple[tuple[str, str], ...] = (
    ("network_type", "network type"),
    ("use_dora", "DoRA"),
    ("optimizer", "optimizer"),
    ("lr_scheduler", "schedule"),
    ("reg_data_dir", "regularization images"),
    ("prior_loss_weight", "prior loss weight"),
    ("mask_dir", "masks"),
    ("masked_loss", "masked loss"),
    ("alpha_mask", "masks from alpha"),
    ("ema_decay", "EMA"),
    ("ema_on_cpu", "EMA in CPU memory"),
    ("val_split", "validation split"),
    ("val_data_dir", "validation images"),
    ("prediction_type", "prediction"),
    ("zero_terminal_snr", "zero terminal SNR"),
)
#: Flux runs also list how the frozen transformer is stored and swapped (`loratui.memory.flux`)
FLUX_OPTIONS: tuple[tuple[str, str], ...] = (
    ("base_weights_dtype", "base weights"),
    ("blocks_to_swap", "blocks swapped"),
    ("t5_max_length", "T5 tokens"),
)


class NoUsableMemory(RuntimeError):
    """The budget could not be determined (NVML unavailable and no --vram/--card)."""


class NoFittingOption(RuntimeError):
    """Nothing the planner can change makes the config fit; the message says what would."""


@dataclass(frozen=True)
class UsableMemory:
    """Bytes training may use, and where the number comes from (for messages)."""

    bytes: int
    label: str
    total: int | None = None


def _margin(total: int) -> int:
    return max(int(total * SAFETY_MARGIN), 256 * MIB)


def usable_from_total(total: int, label: str) -> UsableMemory:
    """A hypothetical card of `total` bytes: minus the driver's share and the safety margin."""
    return UsableMemory(max(total - DRIVER_RESERVE - _margin(total), 0), label, total)


def usable_memory(
    *, gpu: int | None = None, vram: str | None = None, card: str | None = None
) -> UsableMemory:
    """Usable bytes for `--vram`, `--card` or NVML's free memory of GPU `gpu` (default 0)."""
    given = [x for x in (gpu, vram, card) if x is not None]
    if len(given) > 1:
        raise ValueError("name the card once: --vram, --card or (recommend) --gpu")
    if vram is not None:
        from loratui.util.sizes import parse_size

        total = parse_size(vram, card=True)
        return usable_from_total(total, f"a {format_bytes(total)} card (--vram {vram})")
    if card is not None:
        from loratui.memory.cards import card_memory

        name, total = card_memory(card)
        return usable_from_total(total, f"{name} ({format_bytes(total)})")
    from loratui.gpu.nvml import snapshot

    snap = snapshot()
    if not snap.available:
        raise NoUsableMemory(
            f'cannot read GPU memory ({snap.reason}); give the card\'s size with --vram 12GB or --card "RTX 4060"'
        )
    index = gpu or 0
    match = [g for g in snap.gpus if g.index == index]
    if not match:
        raise NoUsableMemory(
            f"no GPU with index {index} (found {len(snap.gpus)}); use --gpu 0..{len(snap.gpus) - 1}"
        )
    info = match[0]
    if info.memory_free is None or info.memory_total is None:
        raise NoUsableMemory(f"GPU {index} does not report its memory; give --vram")
    usable = max(info.memory_free - _margin(info.memory_total), 0)
    label = (
        f"GPU {index} {info.name}: {format_bytes(info.memory_free)} free of {format_bytes(info.memory_total)}"
    )
    return UsableMemory(usable, label, info.memory_total)


def _gpu_or_none() -> UsableMemory | None:
    try:
        return usable_memory()
    except (NoUsableMemory, ValueError):
        return None


def dry_run_prediction(
    resolved: Any, budget: UsableMemory | None = None, *, processes: int = 1
) -> dict[str, Any]:
    """Predicted peak of the config exactly as resolved, before anything is loaded (JSON-ready).

    `budget`: a card given with --vram/--card (a GPU prediction against it); None reads GPU 0 through NVML.
    `processes` > 1: data-parallel training, predicted per process / per GPU (`processes` in the result).
    Keys: device, predicted_peak_bytes, predicted_peak, low_bytes, high_bytes, error_band, phase, method,
    breakdown (bytes), notes, gpu (usable memory of GPU 0 or None), fits, headroom_bytes,
    simulated_budget_bytes, fits_simulated_budget; with no GPU also `cuda_prediction` (the same config on a GPU).
    """
    from loratui.memory.estimate import estimate_peak
    from loratui.memory.meter import simulated_budget_from_env_or_config

    gpu = budget if budget is not None else _gpu_or_none()
    device = "cuda" if gpu is not None else "cpu"
    estimate = estimate_peak(resolved, device=device, processes=processes)
    result: dict[str, Any] = {
        "device": device,
        "processes": processes,
        "fsdp": bool(getattr(getattr(resolved, "config", resolved), "fsdp", False)),
        "predicted_peak_bytes": estimate.total_bytes,
        "predicted_peak": format_bytes(estimate.total_bytes),
        "low_bytes": estimate.low_bytes,
        "high_bytes": estimate.high_bytes,
        "error_band": estimate.error_band,
        "phase": estimate.phase,
        "method": estimate.method,
        "breakdown": dict(estimate.breakdown),
        "notes": list(estimate.notes),
        "gpu": None,
        "fits": None,
        "headroom_bytes": None,
    }
    if gpu is not None:
        result["gpu"] = {"label": gpu.label, "usable_bytes": gpu.bytes, "total_bytes": gpu.total}
        result["headroom_bytes"] = gpu.bytes - estimate.total_bytes
        result["fits"] = result["headroom_bytes"] >= 0
    else:
        result["notes"].append("no NVIDIA GPU found: training would run on the CPU (prediction for the CPU)")
        result["cuda_prediction"] = estimate_peak(resolved, device="cuda", processes=processes).to_dict()
    budget = simulated_budget_from_env_or_config(resolved)
    result["simulated_budget_bytes"] = budget
    result["fits_simulated_budget"] = None if budget is None else estimate.total_bytes <= budget
    result["options"] = option_rows(resolved, estimate.total_bytes, device=device, processes=processes)
    return result


def _checkpoint_schedule(cfg: Any) -> tuple[str | None, bool]:
    """What the base model itself says about prediction type and zero terminal SNR (marker keys, folder
    scheduler config); (None, False) when it says nothing or cannot be read."""
    from loratui.config.base_model import inspect_base_model

    if not cfg.base_model:
        return None, False
    info = inspect_base_model(cfg.base_model)
    return info.prediction_type, info.zero_terminal_snr


def _shown_value(cfg: Any, key: str, value: Any, found: tuple[str | None, bool]) -> str:
    if key == "prediction_type" and value == "auto":
        return f"auto: {found[0] or 'epsilon'}" + (" (v_pred key)" if found[0] else "")
    if key == "zero_terminal_snr" and value is None:
        return "auto: on (ztsnr key)" if found[1] else "auto: off"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "-" if value is None or value == "" else str(value)


def option_rows(
    resolved: Any, total_bytes: int, *, device: str = "cuda", processes: int = 1
) -> list[dict[str, Any]]:
    """One row per `IMAGE_OPTIONS` key of an image run (keys image runs do not read are left out): its value, whether it is the default, and the memory
    it adds (`memory_delta_bytes`: this prediction minus the one with the key at its default; None for a
    default value or when that prediction fails)."""
    from loratui.config.task_keys import IGNORED_BY_TASK
    from loratui.memory.estimate import estimate_peak

    cfg = getattr(resolved, "config", resolved)
    if getattr(cfg, "task_type", "") != "image-generation":
        return []
    from loratui.memory.flux import flux_family

    found = _checkpoint_schedule(cfg)
    ignored = IGNORED_BY_TASK["image-generation"]
    flux = flux_family(cfg, getattr(resolved, "family", None)) is not None
    rows = []
    for key, label in IMAGE_OPTIONS + (FLUX_OPTIONS if flux else ()):
        if key not in type(cfg).model_fields or (key in ignored and key not in dict(FLUX_OPTIONS)):
            continue
        value = getattr(cfg, key)
        default = type(cfg).model_fields[key].get_default(call_default_factory=True)
        delta = None
        if value != default:
            changed = cfg.model_copy(update={key: default})
            without = replace(resolved, config=changed) if hasattr(resolved, "config") else changed
            try:
                delta = total_bytes - estimate_peak(without, device=device, processes=processes).total_bytes
            except Exception:  # the default may not be plannable alone; the row still shows the value
                delta = None
        rows.append(
            {
                "key": key,
                "label": label,
                "value": value,
                "shown": _shown_value(cfg, key, value, found),
                "default": value == default,
                "memory_delta_bytes": delta,
            }
        )
    return rows


def option_lines(rows: list[dict[str, Any]]) -> list[str]:
    """The dry run's compact options block."""
    if not rows:
        return []
    lines = ["options (memory each adds to the prediction):"]
    for row in rows:
        if row["default"]:
            memory = "default"
        elif row["memory_delta_bytes"] is None:
            memory = "not predicted alone"
        elif row["memory_delta_bytes"] == 0:
            memory = "no memory change"
        else:
            memory = format_bytes(row["memory_delta_bytes"], signed=True)
        lines.append(f"  {row['label']:<22} {row['shown']:<26} {memory}")
    return lines


def dry_run_lines(prediction: dict[str, Any]) -> list[str]:
    """Plain text lines for `loratui train --dry-run` (no markup)."""
    band = prediction["error_band"]
    per = f", per process x {prediction['processes']}" if prediction.get("processes", 1) > 1 else ""
    if prediction.get("fsdp"):
        per = f", per GPU, FSDP over {prediction.get('processes', 1)}"
    lines = [
        f"predicted peak memory ({prediction['device']}{per}): {prediction['predicted_peak']} "
        f"(±{band:.0%}: {format_bytes(prediction['low_bytes'])} - {format_bytes(prediction['high_bytes'])}), "
        f"peak during {prediction['phase']}"
    ]
    for name, value in sorted(prediction["breakdown"].items(), key=lambda kv: -kv[1]):
        if value:
            lines.append(f"  {name:<24} {format_bytes(value):>12}")
    if prediction["gpu"] is not None:
        verdict = "fits" if prediction["fits"] else "does NOT fit"
        lines.append(
            f"{verdict} on {prediction['gpu']['label']} "
            f"(headroom {format_bytes(prediction['headroom_bytes'], signed=True)})"
        )
        if not prediction["fits"]:
            lines.append(
                "run `loratui recommend --config ...` for settings that fit, or train with --preset auto"
            )
    if prediction.get("cuda_prediction"):
        lines.append(f"on a GPU this config would need about {prediction['cuda_prediction']['total']}")
    if prediction["simulated_budget_bytes"]:
        state = "fits" if prediction["fits_simulated_budget"] else "exceeds"
        lines.append(f"{state} the simulated card of {format_bytes(prediction['simulated_budget_bytes'])}")
    lines += option_lines(prediction.get("options") or [])
    lines += [f"note: {note}" for note in prediction["notes"]]
    lines.append(f"method: {prediction['method']}")
    return lines


def apply_auto_preset(
    resolved: Any,
    usable_bytes: int | None = None,
    *,
    fixed: frozenset[str] = frozenset(),
    processes: int = 1,
) -> Any:
    """The `ResolvedConfig` with the planner's top option applied (`--preset auto`).

    `usable_bytes` None reads GPU 0 through NVML (`NoUsableMemory` without one). Changed keys are sourced as
    "preset auto (memory planner)"; keys in `fixed` are never changed. Raises `NoFittingOption` when nothing
    fits.
    """
    from loratui.memory.recommend import no_fit_message, recommend

    if usable_bytes is None:
        usable_bytes = usable_memory().bytes
    options = recommend(resolved, usable_bytes, top=1, fixed=fixed, processes=processes)
    if not options:
        raise NoFittingOption(no_fit_message(resolved, usable_bytes, fixed=fixed, processes=processes))
    best = options[0]
    sources = dict(resolved.sources)
    for key in best.changes:
        sources[key] = AUTO_SOURCE
    return replace(resolved, config=best.config, sources=sources, preset="auto")


def tier_budget(vram_gb: float) -> int:
    """Usable bytes of a preset tier's card (`vram_gb` marketing GB = GiB on NVIDIA cards)."""
    return usable_from_total(int(vram_gb * GIB), f"{vram_gb:g} GB tier").bytes


#: the architecture each preset family is checked against
PRESET_ARCHS = {
    "sd15": "sd15",
    "sd2": "sd2",
    "sdxl": "sdxl",
    "flux-dev": "flux1-dev",  # every Flux run (dev, schnell, Chroma) takes the flux-dev section
    # a current model of each LLM size class (shipped configs, `memory/arch_configs/`)
    "llm-3b": "llama-3.2-3b",
    "llm-7b": "llama-3.1-8b",
    "llm-13b": "qwen2.5-14b",
    "llm-32b": "qwen2.5-32b",
    "llm-70b": "llama-3.1-70b",
}


def preset_family_config(family: str, section: dict[str, Any]) -> Any:
    """A TrainConfig for a preset section on its family's reference architecture (no weights needed)."""
    from loratui.config import TrainConfig

    if family.startswith("llm"):
        return TrainConfig(
            task_type="text-generation", model_family="llm", base_model=PRESET_ARCHS[family], **section
        )
    if family.startswith("flux"):
        return TrainConfig(task_type="image-generation", model_family="flux", **section)
    return TrainConfig(task_type="image-generation", model_family=family, **section)


def preset_predictions(preset: Any) -> list[dict[str, Any]]:
    """Predicted peak of each family section of a preset on its tier's card (`vram_gb`)."""
    from loratui.memory.estimate import estimate_peak

    budget = tier_budget(preset.vram_gb)
    rows = []
    for family, section in preset.families.items():
        estimate = estimate_peak(preset_family_config(family, section), device="cuda")
        rows.append(
            {
                "family": family,
                "architecture": PRESET_ARCHS.get(family, family),
                "predicted_peak_bytes": estimate.total_bytes,
                "predicted_peak": format_bytes(estimate.total_bytes),
                "usable_bytes": budget,
                "headroom_bytes": budget - estimate.total_bytes,
                "fits": estimate.total_bytes <= budget,
                "error_band": estimate.error_band,
                "phase": estimate.phase,
            }
        )
    return rows
