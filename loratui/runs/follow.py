"""Plain-text rendering of run events, for headless output, logs and `attach --no-tui`."""

from __future__ import annotations

from typing import Any

FINAL_EVENTS = ("run_finished", "run_failed", "run_stopped")


def _mib(value: Any) -> str:
    return f"{value / 2**20:.0f} MiB" if isinstance(value, int | float) else "-"


def _changes(old: Any, new: Any) -> str:
    """'batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2' (only what changed)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return f"{old} -> {new}"
    parts = [
        f"{k} {old.get(k)} -> {new.get(k)}" for k in dict.fromkeys([*old, *new]) if old.get(k) != new.get(k)
    ]
    return ", ".join(parts) or "no change"


def _format_oom(event: dict[str, Any]) -> str:
    step, rung = event.get("step"), event.get("label") or event.get("rung") or ""
    change = _changes(event.get("old"), event.get("new"))
    if event.get("type") == "oom_recovered":
        seconds = event.get("seconds")
        took = f" in {seconds:.2f} s" if isinstance(seconds, int | float) else ""
        return f"recovered from out of memory at step {step}{took}: {change} ({rung})"
    error = str(event.get("error") or "")[:160]
    then = f"; restarting the worker ({event['restart']})" if event.get("restart") else ""
    return f"out of memory at step {step} ({error}); trying {rung}: {change}{then}"


def format_event(event: dict[str, Any]) -> str | None:
    """One line for an event, or None for events not worth a line."""
    kind = event.get("type")
    step = event.get("step")
    if kind == "run_started":
        text = (
            f"started: {event.get('total_steps')} steps ({event.get('family', '')} {event.get('device', '')})"
        )
        if isinstance(event.get("processes"), int) and event["processes"] > 1:
            text += (
                f"; {event['processes']} processes, batch_size {event.get('batch_size_per_device')} per GPU, "
                f"{event.get('global_batch')} samples per step"
            )
        return text
    if kind == "step":
        loss = event.get("loss")
        loss_text = f"{loss:.4f}" if isinstance(loss, int | float) else str(loss)
        rate = event.get("samples_per_s")
        parts = [
            f"step {step}",
            f"epoch {int(event.get('epoch', 0)) + 1}",
            f"loss {loss_text}",
            f"lr {event.get('lr', 0):.2e}",
        ]
        if isinstance(rate, int | float):
            parts.append(f"{rate:.2f} samples/s")
        margin, accuracy = event.get("reward_margin"), event.get("reward_accuracy")
        if isinstance(margin, int | float) and isinstance(accuracy, int | float):  # DPO/ORPO steps
            parts.append(f"margin {margin:.3f} acc {accuracy:.0%}")
        if "memory_peak" in event:
            parts.append(f"peak {_mib(event['memory_peak'])}")
        ranks = event.get("rank_memory")
        if isinstance(ranks, list) and len(ranks) > 1:
            label = "per GPU" if event.get("rank_memory_kind", "gpu") == "gpu" else "per process"
            parts.append(f"{label} " + "/".join(_mib(v) for v in ranks))
        return " ".join(parts)
    if kind == "checkpoint":
        return f"checkpoint: {event.get('path')}"
    if kind == "sample":
        return f"sample: {event.get('path') or event.get('text', '')}"
    if kind == "eval":
        return f"eval loss {event.get('eval_loss')}"
    if kind in ("oom", "oom_recovered"):
        return _format_oom(event)
    if kind == "warning":
        return f"warning: {event.get('message')}"
    if kind == "error":
        return f"error: {event.get('message')}"
    if kind == "export":
        text = f"exported: {event.get('path')}"
        if event.get("usage"):
            text += f"\n  use it: {event['usage']}"
        return text
    if kind == "run_finished":
        recoveries = event.get("oom_recoveries") or []
        if recoveries:
            changes = "; ".join(
                f"step {r.get('step')}: {_changes(r.get('old'), r.get('new'))}" for r in recoveries
            )
            return f"finished (recovered from out of memory {len(recoveries)} time(s): {changes})"
        return "finished"
    if kind == "run_stopped":
        return f"stopped ({event.get('reason', '')})"
    if kind == "run_failed":
        return f"failed: {event.get('error')}"
    return None
