"""Helpers for tests, screenshots and benchmarks: a synthetic run directory and a text dump of a screen.

No Textual import at module level; nothing here is used by the application itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from loratui.config import ResolvedConfig
from loratui.memory.facade import EstimateView, PlannerFacade, Suggestion
from loratui.runs.status import RunStatus

T0 = 1_795_000_000.0  # fixed clock for synthetic events (screenshots must not depend on the time)
GIB = 1024**3


def synthetic_events(
    *,
    steps: int,
    total_steps: int,
    finished: bool = False,
    oom_at: int | None = None,
    t0: float = T0,
    preference: bool = False,
) -> list[dict[str, Any]]:
    """Events as a trainer writes them: start, steps with a decaying noisy loss, a checkpoint every 50
    steps, a sample every 40, an optional OOM recovery, and at the end an export and run_finished.
    `preference` adds the reward fields of a DPO run to every step."""
    events: list[dict[str, Any]] = [
        {
            "type": "run_started",
            "time": t0,
            "step": 0,
            "total_steps": total_steps,
            "family": "sd15",
            "device": "cuda:0",
        }
    ]
    batch = 4
    for step in range(1, steps + 1):
        when = t0 + 2.0 * step
        if oom_at is not None and step == oom_at:
            old = {"batch_size": batch, "gradient_accumulation_steps": 1}
            new = {"batch_size": batch // 2, "gradient_accumulation_steps": 2}
            events.append(
                {
                    "type": "oom",
                    "time": when,
                    "step": step,
                    "old": old,
                    "new": new,
                    "rung": "halve micro-batch",
                }
            )
            events.append(
                {
                    "type": "oom_recovered",
                    "time": when,
                    "step": step,
                    "old": old,
                    "new": new,
                    "rung": "halve micro-batch",
                }
            )
            batch //= 2
        loss = 0.35 * math.exp(-step / 70) + 0.06 + 0.035 * math.sin(step * 1.7) * math.exp(-step / 400)
        events.append(
            {
                "type": "step",
                "time": when,
                "step": step,
                "epoch": (step - 1) // 40,
                "loss": loss,
                "lr": 1e-4,
                "samples_per_s": 2.0,
                "memory_allocated": int(4.2 * GIB),
                "memory_reserved": int(5.1 * GIB),
                "memory_peak": int(5.4 * GIB),
            }
        )
        if preference:
            margin = 2.4 * (1 - math.exp(-step / 60)) + 0.25 * math.sin(step * 1.3)
            chosen = 0.4 * margin - 0.1
            events[-1].update(
                reward_chosen=chosen,
                reward_rejected=chosen - margin,
                reward_margin=margin,
                reward_accuracy=min(1.0, 0.5 + step / 150),
            )
        if step % 50 == 0:
            events.append(
                {
                    "type": "checkpoint",
                    "time": when,
                    "step": step,
                    "path": f"runs/demo/checkpoints/step-{step}",
                }
            )
        if step % 40 == 0:
            events.append(
                {"type": "sample", "time": when, "step": step, "path": f"runs/demo/samples/step-{step}-0.png"}
            )
    if finished:
        when = t0 + 2.0 * steps + 1
        events.append(
            {
                "type": "export",
                "time": when,
                "step": steps,
                "path": "output/my_style/my_style.safetensors",
                "usage": "<lora:my_style:0.8>",
            }
        )
        events.append({"type": "run_finished", "time": when, "step": steps, "elapsed_s": 2.0 * steps})
    return events


def write_synthetic_run(
    run_dir: Path,
    *,
    steps: int = 120,
    total_steps: int = 200,
    finished: bool = False,
    oom_at: int | None = 50,
    pid: int | None = None,
    epochs: int = 5,
    preference: bool = False,
) -> Path:
    """Write config.yaml, events.jsonl and status.json of a synthetic run; `pid` marks it running."""
    run_dir = Path(run_dir)
    for sub in ("checkpoints", "logs", "samples"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(f"epochs: {epochs}\n", encoding="utf-8")
    events = synthetic_events(
        steps=steps, total_steps=total_steps, finished=finished, oom_at=oom_at, preference=preference
    )
    (run_dir / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events), encoding="utf-8")
    state = "finished" if finished else "running"
    RunStatus(state=state, pid=pid, step=steps, total_steps=total_steps, started_at=T0, updated_at=T0).write(
        run_dir / "status.json"
    )
    return run_dir


def screen_text(app) -> str:
    """The current screen as plain text lines (for assertions on what is visible)."""
    update = app.screen._compositor.render_update(full=True)
    return "\n".join("".join(segment.text for segment in line) for line in update.strips)


def distinct(messages: list, kind: type) -> list:
    """Messages of `kind` in order, each once (a message hook sees a message at every node it bubbles to)."""
    seen_ids: set[int] = set()
    out = []
    for message in messages:
        if isinstance(message, kind) and id(message) not in seen_ids:
            seen_ids.add(id(message))
            out.append(message)
    return out


def run_async(coroutine_function):
    """Decorator: run an async test body with asyncio (no pytest asyncio plugin needed)."""
    import asyncio
    import functools

    @functools.wraps(coroutine_function)
    def wrapper(*args, **kwargs):
        return asyncio.run(coroutine_function(*args, **kwargs))

    return wrapper


async def wait_for(pilot, condition, timeout: float = 15.0) -> None:
    """Let the app run until `condition()` holds (AssertionError after `timeout` seconds)."""
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await pilot.pause(0.05)


#: FakePlanner's made-up extra GiB per optimizer / adapter type (0 for the defaults adamw and lora)
FAKE_OPTIMIZER_GIB = {"prodigy": 0.3, "adamw8bit": -0.1, "adafactor": -0.15, "came": 0.05, "lion": -0.1}
FAKE_NETWORK_GIB = {"locon": 0.1, "loha": 0.2, "lokr": 0.05, "dora": 0.25}


class FakePlanner:
    """A `PlannerFacade` with fixed answers: the real planner traces a reference step (seconds), and screenshots
    must not depend on it."""

    def estimate(self, resolved: ResolvedConfig) -> EstimateView:
        cfg = resolved.config
        extra = FAKE_OPTIMIZER_GIB.get(cfg.optimizer, 0.0) + FAKE_NETWORK_GIB.get(cfg.network_type, 0.0)
        if cfg.ema_decay is not None and not cfg.ema_on_cpu:
            extra += 0.05
        return _view(1.5 + 0.02 * cfg.lora_rank * cfg.batch_size + extra)

    def recommend(self, resolved: ResolvedConfig, usable_bytes: int, *, top: int = 5) -> list[Suggestion]:
        rows: list[tuple[dict[str, object], float, float, str]] = [
            ({"cache_latents": True}, 4.1, 1.15, "latents cached (VAE off the GPU)"),
            ({"batch_size": 2, "gradient_accumulation_steps": 2}, 5.3, 1.3, "same effective batch"),
            (
                {"gradient_checkpointing": True, "batch_size": 4},
                4.6,
                1.1,
                "checkpointing: ~30% slower per sample",
            ),
        ]
        return [
            Suggestion(changes, _view(peak), usable_bytes - int(peak * GIB), speed, note)
            for changes, peak, speed, note in rows
        ][:top]

    def no_fit_message(self, resolved: ResolvedConfig, usable_bytes: int) -> str:
        return f"nothing fits in {usable_bytes} bytes."


def _view(gib: float) -> EstimateView:
    return EstimateView(int(gib * GIB), method="traced reference step", error_band=0.1)


def fake_planner() -> PlannerFacade:
    """A `FakePlanner`; patch `loratui.tui.steps.settings.planner` with this function."""
    return FakePlanner()
