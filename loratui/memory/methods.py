"""What the LLM training `method` changes in a step's memory.

- `sft`: one sequence per sample.
- `dpo`, `orpo`: every sample is a pair, scored in one forward of its chosen and its rejected sequence, so a
  micro-batch of `batch_size` pairs runs `2 x batch_size` rows through the model with gradients.
- `dpo` also runs the same rows once more without gradients for the reference log-probabilities (the adapter
  switched off), before the forward with gradients: its peak is the logits of those rows (no activations are
  kept), on top of the gradients already accumulated.
- `kto`: one sequence per sample with gradients, a reference forward of it without, and once per step a KL
  estimate: forwards without gradients (policy and reference) of mismatched answers, `batch_size` at a time.
"""

from __future__ import annotations

from typing import Any

PAIR_METHODS = ("dpo", "orpo")


def method_of(cfg: Any) -> str:
    return str(getattr(cfg, "method", "sft") or "sft")


def sequences_per_sample(cfg: Any) -> int:
    """Rows through the model per sample of a micro-batch."""
    return 2 if method_of(cfg) in PAIR_METHODS else 1


def has_reference_pass(cfg: Any) -> bool:
    """True when each micro-batch also runs a forward without gradients for a reference model."""
    return method_of(cfg) in ("dpo", "kto")


def method_note(cfg: Any) -> str | None:
    """A line for the estimate's notes, or None for SFT."""
    method = method_of(cfg)
    if method == "kto":
        return (
            "kto: one sequence per sample, plus a reference forward and, once per step, forwards of mismatched "
            "answers for the KL estimate, all without gradients"
        )
    if method not in PAIR_METHODS:
        return None
    note = (
        f"{method}: each sample is a chosen and a rejected sequence ({2 * cfg.batch_size} rows per forward)"
    )
    return note + (", plus a reference forward without gradients" if has_reference_pass(cfg) else "")
