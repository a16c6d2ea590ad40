"""The LLM trainer's side of the OOM ladder: applying rungs to the live model and data, and the chunked loss.

- `gradient_checkpointing`: turned on in the running model (non-reentrant, as at setup);
- `chunked_loss` (rung 3): the decoder's hidden states go through the LM head and the cross-entropy a chunk of
  tokens at a time, each chunk recomputed in backward, so the full `tokens x vocab` logits never exist (on by
  default: the rung only turns it back on);
- `activation_offload` (rung 4, CUDA): nothing to change in the model: the trainer's micro-batch reads the flag and
  keeps saved activations in host memory (`loratui.models.checkpointing.offloaded_activations`);
- `max_seq_len` (rung 6, quality): every unit is cut to the new length (samples left without a target then add
  nothing to the loss); the data order and the number of optimizer steps stay as planned.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loratui.models.checkpointing import NON_REENTRANT, enable_activation_checkpointing
from loratui.models.llm.batches import LLMData, Unit
from loratui.models.llm.chat import IGNORE_INDEX
from loratui.models.llm.loss import causal_lm, supports_chunked_loss
from loratui.models.llm.preference_data import PreferenceData


def cut_units(units: list[Unit], max_seq_len: int) -> list[Unit]:
    """Units cut to `max_seq_len` tokens (the same number of units, in the same order)."""
    out = []
    for unit in units:
        if len(unit.input_ids) <= max_seq_len:
            out.append(unit)
            continue
        labels = unit.labels[:max_seq_len]
        targets = sum(1 for label in labels if label != IGNORE_INDEX)
        positions = unit.position_ids[:max_seq_len] if unit.position_ids is not None else None
        out.append(Unit(unit.input_ids[:max_seq_len], labels, targets, unit.num_samples, positions))
    return out


def cut_data(data: LLMData, max_seq_len: int) -> None:
    """Cut the train and validation units in place (both sides of every pair for preference data)."""
    if isinstance(data, PreferenceData):
        data.cut(max_seq_len)
        return
    data.train[:] = cut_units(data.train, max_seq_len)
    data.val[:] = cut_units(data.val, max_seq_len)


def data_seq_len(job: Any) -> int:
    """The max_seq_len to build the data with: the one this run started with (a worker restarted after the
    ladder lowered max_seq_len cuts the same units instead of rebuilding different ones)."""
    from loratui.train.oom.record import read_record

    started = (read_record(job.run.path).get("started") or {}) if job.run is not None else {}
    current = int(job.resolved.config.max_seq_len)
    return max(current, int(started.get("max_seq_len") or current))


def llm_rung_applier(model: Any, data: LLMData, settings: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """The callback `RecoveringStep` calls with a rung's changes; keeps the checkpoint `settings` current."""

    def apply(changes: dict[str, Any]) -> bool:
        if changes.get("chunked_loss") and not supports_chunked_loss(model):
            return False
        if changes.get("gradient_checkpointing"):
            lm = causal_lm(model)
            enable_activation_checkpointing(lm, NON_REENTRANT)
            lm.enable_input_require_grads()
        if "max_seq_len" in changes:
            cut_data(data, int(changes["max_seq_len"]))
        settings.update({k: v for k, v in changes.items() if k in settings})
        return True

    return apply
