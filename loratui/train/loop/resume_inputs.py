"""Before a resume: the inputs a checkpoint was trained on against the ones the config now names.

A changed base model or dataset (`loratui.data.fingerprint`) is refused unless `--allow-changed-data`; a
changed LoRA rank is always refused (the checkpoint's tensors have the old shape), in one line. A changed
learning rate is applied by the worker when it restores the optimizer (`apply_configured_hyperparameters`).
Checkpoints written before fingerprints existed are not compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.data.fingerprint import input_fingerprints

ALLOW_FLAG = "--allow-changed-data"


class ChangedInputs(ValueError):
    """The resumed run's inputs differ from its checkpoint's; the message says which and what to do."""


def checkpoint_rank(meta: dict[str, Any]) -> int | None:
    """The LoRA rank a checkpoint was trained with (SD: meta["lora"]["rank"], LLM: the adapter config's r)."""
    for value in ((meta.get("lora") or {}).get("rank"), (meta.get("adapter_config") or {}).get("r")):
        if isinstance(value, int):
            return value
    return None


def shape_mismatch_message(checkpoint: Path, meta: dict[str, Any], current: Any) -> str:
    """One line for LoRA tensors whose shapes differ from the checkpoint's (a changed lora_rank)."""
    rank = checkpoint_rank(meta)
    now = current if isinstance(current, int) else _peft_rank(current)
    if rank is not None and now is not None and rank != now:
        return (
            f"lora_rank is {now} but checkpoint {checkpoint} was trained with lora_rank {rank}: "
            f"resume with --set lora_rank={rank}, or start a new run to train another rank"
        )
    return (
        f"checkpoint {checkpoint} does not fit this LoRA (tensor shapes differ: lora_rank or target_modules)"
    )


def _peft_rank(peft_config: Any) -> int | None:
    try:
        return int(peft_config["default"].r)
    except (KeyError, TypeError, AttributeError, ValueError):
        return None


def _describe(print_: dict[str, Any]) -> str:
    if "sha256" not in print_:
        return f"{print_.get('path')} (not found)"
    return f"{print_.get('path')} ({print_['files']} files, {print_['bytes']} bytes)"


def check_resume_inputs(cfg: Any, checkpoint: Path, *, allow_changed_data: bool) -> list[str]:
    """Raise `ChangedInputs` for a changed LoRA rank, and for a changed base model or dataset unless
    `allow_changed_data`; returns warning lines for what was allowed."""
    try:
        meta = json.loads((Path(checkpoint) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    rank = checkpoint_rank(meta)
    if rank is not None and rank != cfg.lora_rank:
        raise ChangedInputs(
            f"lora_rank is {cfg.lora_rank} but checkpoint {checkpoint} was trained with lora_rank {rank}: "
            f"resume with --set lora_rank={rank}, or start a new run to train another rank"
        )
    recorded = meta.get("inputs")
    if not isinstance(recorded, dict):
        return []
    current = input_fingerprints(cfg)
    changed = []
    for key, label in (
        ("base_model", "base_model"),
        ("dataset", "the dataset (train_data_dir)"),
        ("reg_dataset", "the regularization images (reg_data_dir)"),
        ("masks", "the loss masks (mask_dir)"),
    ):
        before, now = recorded.get(key), current.get(key, {})
        if isinstance(before, dict) and before.get("sha256") != now.get("sha256"):
            changed.append(f"{label} changed: checkpoint {_describe(before)}, now {_describe(now)}")
    if not changed:
        return []
    if allow_changed_data:
        return [f"{line}; continuing ({ALLOW_FLAG})" for line in changed]
    raise ChangedInputs(
        f"cannot resume from {checkpoint}: {'; '.join(changed)}. Resume with the inputs it was trained on, "
        f"or pass {ALLOW_FLAG} to continue training on the new ones"
    )
