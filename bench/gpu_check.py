"""One GPU check: memory predictions, speed against bare loops, OOM recovery, the 8 GB pick and precisions.

    python bench/gpu_check.py                        # one CUDA GPU (H100/H200 class), at most 9 minutes
    python bench/gpu_check.py --out DIR --overwrite  # report folder (default gpu_check_report/)
    python bench/gpu_check.py --only llm,oom         # some sections (llm, sd, flux, oom, recommend_8gb, precision)
    python bench/gpu_check.py --smoke --out /tmp/gc  # every path on the CPU with tiny models (under a minute)

Writes `gpu_check.md` (ready to paste into docs/benchmarks.md: date, device from NVML/torch, one table per
section, the checks and their results) and `gpu_check.json` (the raw numbers) to the `--out` folder. Models have
random weights built from configs; nothing is downloaded. Sections:

- llm: Llama-3.2-1B and Llama-3.1-8B shapes, LoRA and QLoRA (needs bitsandbytes), sequence 512 and 2048,
  batch 2, gradient checkpointing on: the planner's prediction (`loratui.memory.estimate.estimate_peak`) vs
  `torch.cuda.max_memory_allocated()` (allocated basis: the prediction without context, workspaces and
  fragmentation) and vs `max_memory_reserved()` + CUDA context (the total); tokens/s of the trainers' real step
  (`loratui.train.memory_check.realstep`) vs a bare transformers + peft loop in the same process;
- sd: SD1.5 architecture 512² fp16 batch 1 and 4 (checkpointing off/on) and SDXL architecture 1024² batch 1
  (checkpointing on): predicted vs measured, samples/s vs a bare diffusers + peft loop (needs diffusers);
- flux: a FLUX.1-dev-architecture transformer (random weights, bf16, built on the GPU) at 1024² and 512², batch
  1, LoRA rank 16, checkpointing on, cached latents and text-encoder outputs synthesised: bf16 vs fp8 base and
  block swap (the flux-dev presets' counts) vs none, with the Flux trainer's own step pieces: the planner's
  training-step prediction vs max allocated / max reserved + context, samples/s, the first-step loss (equal
  with and without block swap); `bench/gpu_check_flux.py` (needs diffusers);
- oom: a real CUDA out-of-memory forced with `torch.cuda.set_per_process_memory_fraction` between the peaks of
  micro-batch 16 x 2 and 32 x 1: the run recovers in-process, finishes its planned steps with the same
  effective batch; the time from the OOM to the next completed step (the `oom_recovered` event);
- recommend_8gb: the recommender's top option for an "8 GB" card (TinyLlama-1.1B seq 2048 batch 8, then SD1.5
  512² batch 8 rank 32) trains 20 steps under an 8 GiB memory fraction (minus driver share and context);
- precision: fp16 (accelerate's grad scaler), bf16, 8-bit AdamW and QLoRA each train steps with a finite,
  falling loss (a ~7M Llama on the demo QA records).

Each section runs on its own: a failing one is reported with its error and the others still run. Each has a
time budget (cases that would not fit are reported as skipped); the budgets keep the whole check under 9
minutes. Missing optional packages make their sections or cases "skipped: <package> not installed". Exit code:
0 when every judged check passed, 1 when one failed, 2 for bad arguments or no GPU without --smoke.

`--smoke` runs the same code on the CPU with the tiny models (`loratui.tiny_models`) and a ~7M Llama: CPU
memory is the memory meter's peak, the OOM is the meter's simulated card, and the "8 GB" card is a simulated
card below the config's predicted peak. It checks the plumbing (every section produces rows with finite numbers);
accuracy and speed thresholds are reported but not judged. The memory rows of QLoRA are skipped there (QLoRA
itself trains on the CPU with bitsandbytes >= 0.50 and is run in the precision section).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

GIB = 2**30
MIB = 2**20
TOTAL_BUDGET_S = 540  # 9 minutes on the GPU
OPTIONAL = ("diffusers", "pydantic", "bitsandbytes")
REPORT_MD = "gpu_check.md"
REPORT_JSON = "gpu_check.json"

from gpu_check_flux import FLUX_COLUMNS  # noqa: E402


class SectionTimeout(BaseException):
    """Raised by the alarm when a section passes its hard time limit (BaseException: not caught by the
    trainers' own error handling)."""


class Skip(Exception):
    """The whole section cannot run here (a missing package); the message is the reason."""


# --- results ---------------------------------------------------------------------------------------------------


@dataclass
class Section:
    name: str
    title: str
    columns: list[tuple[str, str, str]]  # (row key, header, format)
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "not run"
    error: str | None = None
    seconds: float = 0.0
    budget_s: float = 0.0

    def check(self, name: str, passed: bool, detail: str = "", *, judged: bool = True) -> None:
        self.checks.append({"check": name, "passed": bool(passed), "judged": judged, "detail": detail})

    def failed_checks(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if c["judged"] and not c["passed"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 1),
            "budget_s": self.budget_s,
            "rows": self.rows,
            "checks": self.checks,
            "notes": self.notes,
        }


@dataclass
class Context:
    smoke: bool
    device: str  # "cuda" or "cpu"
    work: Path
    packages: dict[str, str | None]
    context_bytes: int = 0
    deadline: float = math.inf  # this section's soft deadline (time.monotonic)
    models: dict[str, Path] = field(default_factory=dict)

    @property
    def judged(self) -> bool:
        """Accuracy and speed thresholds are judged on the GPU only."""
        return not self.smoke

    def has(self, package: str) -> bool:
        return self.packages.get(package) is not None

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def enough(self, seconds: float) -> bool:
        return self.left() >= seconds

    def model(self, key: str, build: Callable[[], Path]) -> Path:
        """A model folder built once per check."""
        if key not in self.models:
            started = time.perf_counter()
            self.models[key] = build()
            print(f"  built {key} in {time.perf_counter() - started:.1f} s", flush=True)
        return self.models[key]


def optional_packages() -> dict[str, str | None]:
    """Version of each optional package that imports here (None when it does not)."""
    found: dict[str, str | None] = {}
    for name in OPTIONAL:
        try:
            module = __import__(name)
            found[name] = str(getattr(module, "__version__", "?"))
        except Exception:
            found[name] = None
    return found


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    for name in ("transformers", "peft", "accelerate"):
        info[name] = __import__(name).__version__
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["name"] = torch.cuda.get_device_name(0)
        info["memory_total"] = int(props.total_memory)
        try:
            from loratui.gpu import nvml

            snap = nvml.snapshot()
            if snap.available and snap.gpus:
                info["nvml_name"] = snap.gpus[0].name
                info["nvml_memory_total"] = snap.gpus[0].memory_total
                info["driver"] = snap.driver_version
        except Exception as exc:  # NVML is optional; torch names the device too
            info["nvml_error"] = str(exc)
    else:
        info["name"] = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), --smoke"
    return info


# --- helpers ---------------------------------------------------------------------------------------------------


def _pct(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def _error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return _pct(predicted / measured - 1)


def _allocated_basis(estimate: Any) -> int:
    """The prediction without what the caching allocator and CUDA add (context, workspaces, fragmentation)."""
    extra = sum(estimate.breakdown.get(k, 0) for k in ("cuda_context", "workspace", "fragmentation"))
    return int(estimate.total_bytes - extra)


def _skipped_row(base: dict[str, Any], reason: str) -> dict[str, Any]:
    return {**base, "status": f"skipped: {reason}"}


def _memory_case_checks(
    ctx: Context, sec: Section, label: str, row: dict[str, Any], required: list[str]
) -> None:
    """Plumbing (always judged) and the thresholds (judged on the GPU)."""
    numbers = [row.get(k) for k in required]
    sec.check(f"{label}: finite numbers", _finite(*numbers), ", ".join(f"{k}={row.get(k)}" for k in required))
    err = row.get("error_vs_reserved") if ctx.device == "cuda" else row.get("error_vs_allocated")
    band = row.get("band")
    if err is not None and band is not None:
        sec.check(
            f"{label}: prediction within its stated band",
            abs(err) <= band,
            f"error {err:+.1%}, band ±{band:.0%}",
            judged=ctx.judged,
        )
    if row.get("speed_ratio") is not None:
        sec.check(
            f"{label}: loratui speed ≥ 0.97 × bare loop",
            row["speed_ratio"] >= 0.97,
            f"ratio {row['speed_ratio']:.3f}",
            judged=ctx.judged,
        )
    if row.get("allocated") and row.get("bare_allocated"):
        ratio = row["allocated"] / row["bare_allocated"]
        sec.check(
            f"{label}: loratui peak allocated ≤ bare loop's + 5 %",
            ratio <= 1.05,
            f"{row['allocated'] / GIB:.2f} vs {row['bare_allocated'] / GIB:.2f} GiB ({ratio:.3f}x)",
            judged=ctx.judged,
        )


def _finite(*values: Any) -> bool:
    from _gpu_common import finite

    return finite(*values)


def _measure_against_prediction(
    ctx: Context, cfg: Any, family: str, steps: int, units: int
) -> dict[str, Any]:
    """Predicted vs measured memory and the real step's rate (units per second) for one config."""
    from _gpu_common import rate, run_real_step

    from loratui.memory.estimate import estimate_peak

    estimate = estimate_peak(cfg, family=family, device=ctx.device)
    measured = run_real_step(cfg, family, steps, on_cpu=ctx.device == "cpu")
    row: dict[str, Any] = {
        "predicted": int(estimate.total_bytes),
        "predicted_allocated_basis": _allocated_basis(estimate),
        "band": estimate.error_band,
        "phase": estimate.phase,
        "allocated": measured.allocated,
        "reserved_plus_context": None if measured.reserved is None else measured.reserved + ctx.context_bytes,
        "rate": rate(units, measured.seconds, warmup=min(2, steps - 1)),
    }
    row["error_vs_allocated"] = _error(row["predicted_allocated_basis"], row["allocated"])
    row["error_vs_reserved"] = _error(row["predicted"], row["reserved_plus_context"])
    return row


def _add_bare(row: dict[str, Any], bare: Any, units: int, steps: int) -> None:
    from _gpu_common import rate

    row["bare_allocated"] = bare.allocated
    row["bare_rate"] = rate(units, bare.seconds, warmup=min(2, steps - 1))
    row["speed_ratio"] = round(row["rate"] / row["bare_rate"], 4)


def _measured_columns(unit: str, rate_format: str) -> list[tuple[str, str, str]]:
    """The columns every measured LLM/SD row shares: memory predicted vs measured, speed vs the bare loop."""
    return [
        ("predicted", "predicted (total)", "gib"),
        ("reserved_plus_context", "max reserved + context", "gib"),
        ("error_vs_reserved", "error", "pct"),
        ("predicted_allocated_basis", "predicted (allocated basis)", "gib"),
        ("allocated", "max allocated", "gib"),
        ("error_vs_allocated", "error", "pct"),
        ("bare_allocated", "bare loop max allocated", "gib"),
        ("rate", f"loratui {unit}", rate_format),
        ("bare_rate", f"bare {unit}", rate_format),
        ("speed_ratio", "ratio", "ratio"),
        ("status", "status", "text"),
    ]


# --- LLM -------------------------------------------------------------------------------------------------------

LLM_COLUMNS = [
    ("model", "model", "text"),
    ("method", "method", "text"),
    ("seq", "seq", "int"),
    ("batch", "batch", "int"),
    *_measured_columns("tokens/s", "rate"),
]


def section_llm(ctx: Context, sec: Section) -> None:
    from _gpu_common import LLAMA_SHAPES, bare_llm_loop, build_llama_shape

    from loratui.config import TrainConfig

    if ctx.smoke:
        from bench_llm_common import build_model

        from loratui.tiny_models.llama import build_tiny_llama

        shapes = [
            ("tiny Llama (for Llama-3.2-1B)", lambda: build_tiny_llama(ctx.work / "tiny-llama"), 20),
            ("~7M Llama (for Llama-3.1-8B)", lambda: build_model(ctx.work / "small-llama", "small"), 20),
        ]
        seqs, steps, batch = [64], 2, 2
        sec.notes.append("--smoke: CPU, tiny models; memory is the memory meter's peak (no allocator).")
    else:
        shapes = [
            (
                name,
                lambda name=name: build_llama_shape(ctx.work / name, LLAMA_SHAPES[name], device="cuda"),
                cost,
            )
            for name, cost in (("Llama-3.2-1B", 30), ("Llama-3.1-8B", 60))
        ]
        seqs, steps, batch = [512, 2048], 6, 2
    sec.notes.append(
        f"batch {batch}, LoRA rank 16 on q,k,v,o, bf16, gradient checkpointing on, rows full to the sequence "
        f"length; {steps} steps per run, rate = median after the first {min(2, steps - 1)}."
    )
    # the longest sequence first (the published peers' setting), so a tight budget drops the short ones
    cases = [
        (shape, method, seq)
        for seq in sorted(seqs, reverse=True)
        for shape in shapes
        for method in ("lora", "qlora")
    ]
    for (label, build, cost), method, seq in cases:
        base = {"model": label, "method": method, "seq": seq, "batch": batch}
        if method == "qlora" and not ctx.has("bitsandbytes"):
            sec.rows.append(_skipped_row(base, "bitsandbytes not installed"))
            continue
        if method == "qlora" and ctx.device == "cpu":
            sec.rows.append(_skipped_row(base, "QLoRA needs CUDA"))
            continue
        if not ctx.enough(cost):
            sec.rows.append(_skipped_row(base, f"time budget ({ctx.left():.0f} s left)"))
            continue
        folder = ctx.model(label, build)
        cfg = TrainConfig(
            task_type="text-generation",
            model_family="llm",
            base_model=str(folder),
            train_data_dir=str(ctx.work),
            mixed_precision="bf16",
            lora_rank=16,
            batch_size=batch,
            max_seq_len=seq,
            gradient_checkpointing=True,
            load_in_4bit=method == "qlora",
            seed=0,
        )
        print(f"  llm: {label} {method} seq {seq}", flush=True)
        row = {**base, **_measure_against_prediction(ctx, cfg, "llm", steps, batch * seq)}
        bare = bare_llm_loop(
            folder,
            qlora=method == "qlora",
            seq=seq,
            batch=batch,
            steps=steps,
            checkpointing=True,
            device=ctx.device,
        )
        _add_bare(row, bare, batch * seq, steps)
        row["status"] = "ok"
        sec.rows.append(row)
        _memory_case_checks(
            ctx,
            sec,
            f"{label} {method} seq {seq}",
            row,
            ["predicted", "allocated", "rate", "bare_rate"],
        )


# --- Stable Diffusion ------------------------------------------------------------------------------------------

SD_COLUMNS = [
    ("model", "model", "text"),
    ("resolution", "resolution", "int"),
    ("batch", "batch", "int"),
    ("checkpointing", "grad ckpt", "text"),
    *_measured_columns("samples/s", "rate2"),
]


def section_sd(ctx: Context, sec: Section) -> None:
    if not ctx.has("diffusers"):
        raise Skip("diffusers not installed")
    from _gpu_common import bare_sd_loop
    from bench_memory_gpu import build_sd_folder

    from loratui.config import TrainConfig
    from loratui.train.memory_check.realstep import write_image_dataset

    if ctx.smoke:
        from loratui.tiny_models.sd import build_tiny_sd

        sd15 = ("tiny SD1.5 layout", "sd15", lambda: build_tiny_sd(ctx.work / "tiny-sd15", "sd15"), 64)
        sdxl = ("tiny SDXL layout", "sdxl", lambda: build_tiny_sd(ctx.work / "tiny-sdxl", "sdxl"), 64)
        steps = 2
        sec.notes.append("--smoke: CPU (fp32), tiny models, 64 px; memory is the memory meter's peak.")
    else:
        sd15 = ("SD1.5", "sd15", lambda: build_sd_folder("sd15", ctx.work / "sd15", device="cuda"), 512)
        sdxl = ("SDXL", "sdxl", lambda: build_sd_folder("sdxl", ctx.work / "sdxl", device="cuda"), 1024)
        steps = 6
    sec.notes.append(
        f"fp16 mixed precision, LoRA rank 16 on to_q,to_k,to_v,to_out.0, no latent or text caching (both sides "
        f"encode every step); {steps} steps per run, rate = median after the first {min(2, steps - 1)}."
    )
    if ctx.smoke:  # the same paths, fewer repeats: checkpointing off and on, batch 1 and more, SDXL
        cases = [(sd15, 1, False, 0), (sd15, 2, True, 0), (sdxl, 1, True, 0)]
    else:
        cases = [(sd15, b, ckpt, 20 if b == 1 else 25) for b in (1, 4) for ckpt in (False, True)]
        cases.append((sdxl, 1, True, 60))
    for (label, family, build, resolution), batch, ckpt, cost in cases:
        base = {"model": label, "resolution": resolution, "batch": batch, "checkpointing": ckpt}
        if not ctx.enough(cost):
            sec.rows.append(_skipped_row(base, f"time budget ({ctx.left():.0f} s left)"))
            continue
        folder = ctx.model(label, build)
        data = write_image_dataset(ctx.work / f"images-{resolution}", 4, resolution)
        cfg = TrainConfig(
            task_type="image-generation",
            model_family=family,
            base_model=str(folder),
            train_data_dir=str(data),
            resolution=resolution,
            batch_size=batch,
            gradient_checkpointing=ckpt,
            mixed_precision="fp16",
            lora_rank=16,
            seed=0,
        )
        print(f"  sd: {label} {resolution}² batch {batch} ckpt {ckpt}", flush=True)
        row = {**base, **_measure_against_prediction(ctx, cfg, family, steps, batch)}
        bare = bare_sd_loop(
            folder,
            family=family,
            resolution=resolution,
            batch=batch,
            steps=steps,
            checkpointing=ckpt,
            device=ctx.device,
        )
        _add_bare(row, bare, batch, steps)
        row["status"] = "ok"
        sec.rows.append(row)
        name = f"{label} {resolution}² batch {batch} ckpt {'on' if ckpt else 'off'}"
        _memory_case_checks(ctx, sec, name, row, ["predicted", "allocated", "rate", "bare_rate"])


# --- Flux ------------------------------------------------------------------------------------------------------


def section_flux(ctx: Context, sec: Section) -> None:
    """FLUX.1-dev architecture at 1024² and 512², bf16 vs fp8 base, block swap vs none (`gpu_check_flux`)."""
    if not ctx.has("diffusers"):
        raise Skip("diffusers not installed")
    from gpu_check_flux import run_flux_section

    run_flux_section(ctx, sec)


# --- OOM recovery ----------------------------------------------------------------------------------------------

OOM_COLUMNS = [
    ("case", "case", "text"),
    ("limit", "limit", "text"),
    ("configured", "configured", "text"),
    ("after", "after recovery", "text"),
    ("rungs", "rungs", "text"),
    ("steps_done", "steps done", "int"),
    ("steps_planned", "planned", "int"),
    ("recovery_s", "OOM → next completed step (s)", "s3"),
    ("ordinary_step_s", "ordinary step (s)", "s3"),
    ("state", "run state", "text"),
]


def _train_with_events(values: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    from bench_oom_recovery import _job

    from loratui.runs.events import read_events
    from loratui.train.llm.trainer import run_training

    job = _job(values)
    result = run_training(job, console=False)
    return result.state, read_events(job.run.events_path)


def section_oom(ctx: Context, sec: Section) -> None:
    import torch
    from _gpu_common import free_memory
    from bench_llm_common import build_model, write_dataset
    from bench_oom_recovery import _step_seconds, _values

    work = ctx.work / "oom"
    work.mkdir(exist_ok=True)
    if ctx.smoke:
        from loratui.tiny_models.llama import build_tiny_llama

        model = build_tiny_llama(work / "tiny-llama")
        data = write_dataset(work / "data.jsonl", 32, short=True)
        common: dict[str, Any] = {"max_steps": 4, "simulate_vram": "1TiB"}
        small, large = (2, 2), (4, 1)
    else:
        model = ctx.model("~7M Llama", lambda: build_model(ctx.work / "small-llama", "small"))
        data = write_dataset(work / "data.jsonl", 256)
        common = {"max_seq_len": 512, "mixed_precision": "bf16", "max_steps": 6}
        small, large = (16, 2), (32, 1)

    def peak(tag: str, batch: int, accumulation: int) -> int:
        free_memory()
        if ctx.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        values = _values(
            work, model, data, tag, **common, batch_size=batch, gradient_accumulation_steps=accumulation
        )
        _, events = _train_with_events(values)
        if ctx.device == "cuda":
            return int(torch.cuda.max_memory_reserved())
        steps = [e for e in events if e["type"] == "step"]
        pick = max if accumulation > 1 else min
        return int(pick(e["meter_peak"] for e in steps))

    peak_small = peak("cal-small", *small)
    peak_large = peak("cal-large", *large)
    limit = (peak_small + peak_large) // 2
    planned = int(common["max_steps"])
    values = _values(work, model, data, "oom", **common, batch_size=large[0], gradient_accumulation_steps=1)
    free_memory()
    if ctx.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        sec.notes.append(
            f"reserved peaks: {small[0]} x {small[1]} {peak_small / MIB:.0f} MiB, {large[0]} x 1 "
            f"{peak_large / MIB:.0f} MiB; torch.cuda.set_per_process_memory_fraction({limit / total:.5f})."
        )
        torch.cuda.set_per_process_memory_fraction(limit / total)
        try:
            state, events = _train_with_events(values)
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        limit_text = f"memory fraction {limit / MIB:.0f} MiB"
    else:
        values["simulate_vram"] = str(limit)
        sec.notes.append(
            "--smoke: the memory meter's simulated card raises torch.OutOfMemoryError on the CPU."
        )
        state, events = _train_with_events(values)
        limit_text = f"simulated card {limit / MIB:.1f} MiB"
    ooms = [e for e in events if e["type"] == "oom"]
    recovered = [e for e in events if e["type"] == "oom_recovered"]
    steps = [e for e in events if e["type"] == "step"]
    old = recovered[0]["old"] if recovered else {}
    new = recovered[-1]["new"] if recovered else {}

    def effective(settings: dict[str, Any]) -> int | None:
        if "batch_size" not in settings:
            return None
        return int(settings["batch_size"]) * int(settings.get("gradient_accumulation_steps", 1))

    ordinary = _step_seconds(events, after=1)
    row = {
        "case": "Llama, micro-batch OOM",
        "limit": limit_text,
        "configured": f"{large[0]} x 1",
        "after": f"{new.get('batch_size')} x {new.get('gradient_accumulation_steps')}" if new else "-",
        "rungs": ", ".join(e["rung"] for e in ooms) or "-",
        "steps_done": len(steps),
        "steps_planned": planned,
        "recovery_s": float(recovered[0]["seconds"]) if recovered else None,
        "ordinary_step_s": statistics.median(ordinary) if ordinary else None,
        "state": state,
        "status": "ok",
    }
    sec.rows.append(row)
    sec.check("a real out-of-memory error was raised", bool(ooms), f"{len(ooms)} oom event(s)")
    sec.check("recovered in-process", bool(recovered) and state == "finished", f"run state {state}")
    sec.check(
        "finished its planned steps",
        len(steps) == planned and bool(steps) and steps[-1]["step"] == planned,
        f"{len(steps)} of {planned}",
    )
    sec.check(
        "same effective batch",
        effective(old) is not None and effective(old) == effective(new),
        f"{effective(old)} before, {effective(new)} after",
    )
    sec.check("recovery time is a finite number", _finite(row["recovery_s"]), f"{row['recovery_s']}")


# --- the recommender's pick for an 8 GB card -------------------------------------------------------------------

RECOMMEND_COLUMNS = [
    ("case", "config", "text"),
    ("changes", "top option's changes", "text"),
    ("card", "card", "text"),
    ("predicted", "predicted", "gib"),
    ("measured", "measured", "gib"),
    ("steps_done", "steps", "int"),
    ("oom", "OOM", "text"),
    ("status", "status", "text"),
]


def section_recommend(ctx: Context, sec: Section) -> None:
    import torch
    from _gpu_common import free_memory

    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.memory.estimate import estimate_peak
    from loratui.memory.integration import DRIVER_RESERVE, usable_from_total
    from loratui.memory.recommend import recommend
    from loratui.train.memory_check.realstep import llm_real_step, sd_real_step, write_image_dataset

    steps = 3 if ctx.smoke else 20
    cases: list[tuple[str, str, Callable[[], TrainConfig], float]] = []
    if ctx.smoke:
        from loratui.tiny_models.llama import build_tiny_llama

        llama = build_tiny_llama(ctx.work / "tiny-llama")
        llm_values = {"max_seq_len": 128, "batch_size": 8}
        sec.notes.append(
            "--smoke: the card is a simulated one (memory meter) at 70 % of the config's predicted CPU peak; "
            f"{steps} steps."
        )
    else:
        from bench_memory_gpu import build_llama_folder

        llama = ctx.model(
            "TinyLlama-1.1B", lambda: build_llama_folder(ctx.work / "tinyllama", ctx.work, "cuda")
        )
        llm_values = {"max_seq_len": 2048, "batch_size": 8}

    def lm() -> TrainConfig:
        return TrainConfig(
            task_type="text-generation",
            model_family="llm",
            base_model=str(llama),
            train_data_dir=str(ctx.work),
            mixed_precision="bf16",
            lora_rank=16,
            seed=0,
            **llm_values,
        )

    llm_label = "tiny Llama seq 128 batch 8" if ctx.smoke else "TinyLlama-1.1B seq 2048 batch 8"
    cases.append((llm_label, "llm", lm, 60))
    if ctx.has("diffusers"):
        from bench_memory_gpu import build_sd_folder

        def sd() -> TrainConfig:
            if ctx.smoke:
                from loratui.tiny_models.sd import build_tiny_sd

                folder, res = build_tiny_sd(ctx.work / "tiny-sd15", "sd15"), 64
            else:
                folder = ctx.model("SD1.5", lambda: build_sd_folder("sd15", ctx.work / "sd15", device="cuda"))
                res = 512
            data = write_image_dataset(ctx.work / f"images8-{res}", 8, res)
            return TrainConfig(
                task_type="image-generation",
                model_family="sd15",
                base_model=str(folder),
                train_data_dir=str(data),
                resolution=res,
                batch_size=8,
                lora_rank=32,
                mixed_precision="fp16",
                seed=0,
            )

        cases.append(
            ("SD1.5 512² batch 8 rank 32" if not ctx.smoke else "tiny SD1.5 64² batch 8", "sd15", sd, 45)
        )
    else:
        sec.rows.append({"case": "SD1.5 512² batch 8 rank 32", "status": "skipped: diffusers not installed"})
    for label, family, make, cost in cases:
        if not ctx.enough(cost if not ctx.smoke else 0):
            sec.rows.append({"case": label, "status": f"skipped: time budget ({ctx.left():.0f} s left)"})
            continue
        cfg = make()
        if ctx.smoke:
            card = int(estimate_peak(cfg, family=family, device="cpu").total_bytes * 0.7)
            usable, card_text = card, f"simulated {card / MIB:.1f} MiB"
        else:
            usable, card_text = usable_from_total(8 * GIB, "8 GB card").bytes, "8 GiB"
        options = recommend(ResolvedConfig(cfg, {}, family), usable, top=1, device=ctx.device)
        if not options:
            sec.rows.append({"case": label, "card": card_text, "status": "no option fits"})
            sec.check(f"{label}: an option fits", False, f"no option for {card_text}")
            continue
        option = options[0]
        row: dict[str, Any] = {
            "case": label,
            "changes": ", ".join(f"{k}={v}" for k, v in option.changes.items()) or "(none)",
            "card": card_text,
            "predicted": int(option.estimate.total_bytes),
        }
        print(f"  recommend_8gb: {label} -> {row['changes']}", flush=True)
        free_memory()
        done, oom = 0, False
        step = None
        try:
            if ctx.device == "cuda":
                total = torch.cuda.get_device_properties(0).total_memory
                limit = 8 * GIB - DRIVER_RESERVE - ctx.context_bytes
                torch.cuda.reset_peak_memory_stats()
                torch.cuda.set_per_process_memory_fraction(limit / total)
                budget = None
            else:
                budget = usable
            step = llm_real_step(option.config) if family == "llm" else sd_real_step(option.config, family)
            if budget is not None:
                from loratui.memory.meter import MemoryMeter

                meter = MemoryMeter(budget_bytes=budget)
                for module in step.modules:
                    meter.register_model(module)
                meter.register_optimizer(step.optimizer)
                meter.reset_peak()
                try:
                    for _ in range(steps):
                        with meter:
                            step.run(None)
                        done += 1
                finally:
                    row["measured"] = int(meter.peak_bytes)
                    meter.close()
            else:
                for _ in range(steps):
                    step.run(None)
                    done += 1
                torch.cuda.synchronize()
                row["measured"] = int(torch.cuda.max_memory_reserved()) + ctx.context_bytes
        except torch.OutOfMemoryError as exc:
            oom = True
            row["error"] = str(exc).splitlines()[0]
        finally:
            if ctx.device == "cuda":
                torch.cuda.set_per_process_memory_fraction(1.0)
            del step
            free_memory()
        row.update({"steps_done": done, "oom": "yes" if oom else "no", "status": "ok" if not oom else "OOM"})
        sec.rows.append(row)
        sec.check(
            f"{label}: top option trains {steps} steps without OOM",
            done == steps and not oom,
            f"{done} steps" + (f"; {row.get('error')}" if oom else ""),
        )
        sec.check(f"{label}: finite numbers", _finite(row["predicted"], row.get("measured")), "")


# --- precisions ------------------------------------------------------------------------------------------------

PRECISION_COLUMNS = [
    ("variant", "variant", "text"),
    ("precision", "precision used", "text"),
    ("steps_done", "steps", "int"),
    ("first_loss", "first loss (mean of 3)", "f4"),
    ("last_loss", "last loss (mean of 3)", "f4"),
    ("status", "status", "text"),
]


def section_precision(ctx: Context, sec: Section) -> None:
    from bench_llm_common import build_model, job_for, write_dataset

    from loratui.runs.events import read_events
    from loratui.train.llm.trainer import run_training

    work = ctx.work / "precision"
    work.mkdir(exist_ok=True)
    if ctx.smoke:
        from loratui.tiny_models.llama import build_tiny_llama

        model = build_tiny_llama(ctx.work / "tiny-llama")
        max_steps = 10
        sec.notes.append(
            "--smoke: on the CPU loratui trains fp16 configs in fp32 (fp16 autocast is GPU-only)."
        )
    else:
        model = ctx.model("~7M Llama", lambda: build_model(ctx.work / "small-llama", "small"))
        max_steps = 30
    data = write_dataset(work / "data.jsonl", 64, short=True)
    sec.notes.append(
        f"LoRA rank 16 on all linear layers, lr 3e-3, batch 4, {max_steps} steps, demo QA records; falling = mean "
        "loss of the last 3 steps below that of the first 3."
    )
    variants = [
        ("fp16 + loss scaling", {"mixed_precision": "fp16"}, None),
        ("bf16", {"mixed_precision": "bf16"}, None),
        ("8-bit AdamW", {"mixed_precision": "bf16", "optimizer": "adamw8bit"}, "bitsandbytes"),
        ("QLoRA (NF4)", {"mixed_precision": "bf16", "load_in_4bit": True}, "bitsandbytes"),
    ]
    for name, changes, needs in variants:
        base = {"variant": name}
        if needs and not ctx.has(needs):
            sec.rows.append(_skipped_row(base, f"{needs} not installed"))
            continue
        if not ctx.enough(10 if not ctx.smoke else 0):
            sec.rows.append(_skipped_row(base, f"time budget ({ctx.left():.0f} s left)"))
            continue
        tag = name.split()[0].lower().replace("-", "")
        values = {
            "task_type": "text-generation",
            "base_model": str(model),
            "train_data_dir": str(data),
            "output_dir": str(work / f"out-{tag}"),
            "runs_dir": str(work / "runs"),
            "lora_rank": 16,
            "target_modules": ["all-linear"],
            "learning_rate": 3e-3,
            "batch_size": 4,
            "max_steps": max_steps,
            "max_seq_len": 128,
            "save_steps": None,
            "seed": 0,
            **changes,
        }
        print(f"  precision: {name}", flush=True)
        job = job_for(values)
        result = run_training(job, console=False)
        events = read_events(job.run.events_path)
        losses = [float(e["loss"]) for e in events if e["type"] == "step"]
        started = [e for e in events if e["type"] == "run_started"]
        precision = (started[0].get("precision") if started else None) or changes["mixed_precision"]
        row = {
            **base,
            "precision": str(precision),
            "steps_done": len(losses),
            "first_loss": statistics.fmean(losses[:3]) if losses else None,
            "last_loss": statistics.fmean(losses[-3:]) if losses else None,
            "state": result.state,
            "status": "ok",
        }
        sec.rows.append(row)
        sec.check(
            f"{name}: {max_steps} steps", len(losses) == max_steps, f"{len(losses)} steps, {result.state}"
        )
        sec.check(f"{name}: finite loss", bool(losses) and _finite(*losses), "")
        sec.check(
            f"{name}: falling loss",
            bool(losses) and row["last_loss"] < row["first_loss"],
            f"{row['first_loss']:.4f} -> {row['last_loss']:.4f}" if losses else "no steps",
        )


# --- running and reporting -------------------------------------------------------------------------------------

SECTIONS: list[tuple[str, str, list, Callable[[Context, Section], None], float]] = [
    ("llm", "LLM: predicted vs measured memory, tokens/s vs a bare loop", LLM_COLUMNS, section_llm, 200),
    (
        "sd",
        "Stable Diffusion: predicted vs measured memory, samples/s vs a bare loop",
        SD_COLUMNS,
        section_sd,
        125,
    ),
    (
        "flux",
        "Flux: predicted vs measured memory, samples/s, bf16 vs fp8 base, block swap",
        FLUX_COLUMNS,
        section_flux,
        80,
    ),
    ("oom", "A real out-of-memory error, recovered in-process", OOM_COLUMNS, section_oom, 40),
    (
        "recommend_8gb",
        'The recommender\'s top option for an "8 GB" card, 20 steps',
        RECOMMEND_COLUMNS,
        section_recommend,
        55,
    ),
    (
        "precision",
        "Precisions and optimizers: finite, falling loss",
        PRECISION_COLUMNS,
        section_precision,
        40,
    ),
]


def _alarm(signum: int, frame: Any) -> None:
    raise SectionTimeout()


def run_section(ctx: Context, sec: Section, fn: Callable[[Context, Section], None], hard_s: float) -> None:
    started = time.monotonic()
    ctx.deadline = started + sec.budget_s
    use_alarm = hasattr(signal, "setitimer") and hard_s > 0
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, hard_s)
    try:
        fn(ctx, sec)
        failed = sec.failed_checks()
        sec.status = "failed" if failed else "passed"
        if not sec.rows:
            sec.status, sec.error = "failed", "no rows"
    except Skip as exc:
        sec.status = f"skipped: {exc}"
    except SectionTimeout:
        sec.status, sec.error = "failed", f"time limit of {hard_s:.0f} s passed"
    except Exception as exc:
        sec.status = "failed"
        sec.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        sec.notes.append("traceback:\n" + traceback.format_exc(limit=6))
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        sec.seconds = time.monotonic() - started
        try:
            from _gpu_common import free_memory

            free_memory()
        except Exception:
            pass
    print(
        f"[{sec.name}] {sec.status} in {sec.seconds:.1f} s" + (f": {sec.error}" if sec.error else ""),
        flush=True,
    )


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "gib":
        return f"{value / GIB:.2f} GiB" if value >= 0.1 * GIB else f"{value / MIB:.1f} MiB"
    if kind == "pct":
        return f"{value:+.1%}"
    if kind == "rate":
        return f"{value:,.0f}"
    if kind == "rate2":
        return f"{value:.2f}"
    if kind == "ratio":
        return f"{value:.3f}"
    if kind == "s3":
        return f"{value:.3f}"
    if kind == "f4":
        return f"{value:.4f}"
    if kind == "int":
        return str(int(value))
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def render_markdown(result: dict[str, Any], sections: list[Section]) -> str:
    device = result["device"]
    lines = [
        f"### GPU check, {result['date']}: {device.get('nvml_name') or device['name']}",
        "",
        f"`python bench/gpu_check.py{' --smoke' if result['smoke'] else ''}`; total {result['seconds']:.0f} s; "
        f"result: **{'all checks passed' if result['passed'] else 'some checks failed'}**.",
        "",
        "Device: "
        + ", ".join(
            f"{k} {v / GIB:.1f} GiB"
            if k.startswith("memory_total") or k == "nvml_memory_total"
            else f"{k} {v}"
            for k, v in device.items()
            if v is not None and k != "name"
        )
        + ".",
        "Optional packages: "
        + ", ".join(f"{k} {v}" if v else f"{k} not installed" for k, v in result["packages"].items())
        + ".",
    ]
    if not result["smoke"]:
        lines.append(
            f"CUDA context (NVML device memory after CUDA initialisation minus the allocator's reserve): "
            f"{result['context_bytes'] / MIB:.0f} MiB. Sizes in GiB (2³⁰ bytes)."
        )
    else:
        lines.append("**--smoke on the CPU: plumbing check with tiny models; these are not GPU figures.**")
    for sec in sections:
        lines += [
            "",
            f"#### {sec.title}",
            "",
            f"Status: {sec.status} ({sec.seconds:.0f} s of {sec.budget_s:.0f} s).",
        ]
        if sec.error:
            lines.append(f"Error: `{sec.error}`")
        if sec.rows:
            lines += ["", "| " + " | ".join(h for _, h, _ in sec.columns) + " |"]
            lines.append("|" + "---|" * len(sec.columns))
            for row in sec.rows:
                lines.append("| " + " | ".join(_fmt(row.get(k), f) for k, _, f in sec.columns) + " |")
        for note in sec.notes:
            if not note.startswith("traceback:"):
                lines += ["", note]
        if sec.checks:
            lines.append("")
            for c in sec.checks:
                mark = ("pass" if c["passed"] else "FAIL") if c["judged"] else "not judged (--smoke)"
                lines.append(f"- {c['check']}: {mark}" + (f" ({c['detail']})" if c["detail"] else ""))
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_report"), help="report folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in --out")
    parser.add_argument("--smoke", action="store_true", help="CPU plumbing check with tiny models")
    parser.add_argument("--work", type=Path, help="folder for the built models (default: a temporary one)")
    parser.add_argument("--only", help="comma-separated sections: " + ",".join(s[0] for s in SECTIONS))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    args = parse_args(argv)
    names = [s[0] for s in SECTIONS]
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        print(
            f"error: --only: unknown section {', '.join(unknown)}; choose from {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    out = args.out
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} is a file; give a folder for the report", file=sys.stderr)
        return 2
    existing = [out / n for n in (REPORT_MD, REPORT_JSON) if (out / n).exists()]
    if existing and not args.overwrite:
        print(
            f"error: {existing[0]} already exists; pass --overwrite to replace it or choose another --out",
            file=sys.stderr,
        )
        return 2
    packages = optional_packages()
    print(
        "optional packages: "
        + ", ".join(f"{k} {v}" if v else f"{k} NOT importable" for k, v in packages.items()),
        flush=True,
    )
    if packages["pydantic"] is None:
        print(
            "error: pydantic is not importable; loratui's config needs it (install its wheel)",
            file=sys.stderr,
        )
        return 2
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("error: no CUDA GPU here; run with --smoke for the CPU plumbing check", file=sys.stderr)
        return 2
    date = dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="loratui-gpu-check-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("LORATUI_CACHE_DIR", str(work / "cache"))
        ctx = Context(smoke=args.smoke, device="cuda" if cuda else "cpu", work=work, packages=packages)
        if cuda:
            from bench_memory_gpu import cuda_context_bytes

            ctx.context_bytes = cuda_context_bytes()
        info = device_info(ctx.device)
        print(f"device: {info['name']}", flush=True)
        sections = []
        for name, title, columns, fn, budget in SECTIONS:
            if name not in only:
                continue
            sec = Section(name, title, columns)
            remaining = TOTAL_BUDGET_S - (time.monotonic() - started)
            # GPU: the section's budget, never past the 9-minute total; --smoke: no budget (tiny models).
            sec.budget_s = 600.0 if args.smoke else max(0.0, min(budget, remaining - 5))
            hard = 0.0 if args.smoke else max(sec.budget_s + 30, 1.0)
            print(f"[{name}] {title} (budget {sec.budget_s:.0f} s)", flush=True)
            run_section(ctx, sec, fn, hard)
            sections.append(sec)
    passed = all(not s.status.startswith("failed") for s in sections)
    result = {
        "date": date,
        "smoke": args.smoke,
        "device": info,
        "packages": packages,
        "context_bytes": ctx.context_bytes,
        "seconds": round(time.monotonic() - started, 1),
        "passed": passed,
        "sections": [s.to_dict() for s in sections],
    }
    (out / REPORT_JSON).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")
    (out / REPORT_MD).write_text(render_markdown(result, sections), encoding="utf-8")
    print(f"report: {out / REPORT_MD}; raw numbers: {out / REPORT_JSON}")
    print("all checks passed" if passed else "some checks FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
