"""The LLM trainer's side of the OOM ladder: applying rungs to the live model and data, and the chunked loss.

- `gradient_checkpointing`: turned on in the running model (non-reentrant, as at setup);
- `chunked_loss` (rung 3): the decoder's hidden states go through the LM head and the cross-entropy a chunk of
  tokens at a time, each chunk recomputed in backward, so the full `tokens x vocab` logits never exist;
- `max_seq_len` (rung 5, quality): every unit is cut to the new length (samples left without a target then add
  nothing to the loss); the data order and the number of optimizer steps stay as planned.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from loratui.train.llm_chat import IGNORE_INDEX
from loratui.train.llm_data import Batch, LLMData, Unit

CHUNK_TOKENS = 1024


def _causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside PEFT/accelerate wrappers."""
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def supports_chunked_loss(model: Any) -> bool:
    """Plain `lm_head(hidden)` logits only (no logit soft-capping or scaling in the model's forward)."""
    lm = _causal_lm(model)
    config = getattr(lm, "config", None)
    special = any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    return hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None and not special


def _chunk_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_token_loss_sum(
    model: Any, batch: Batch, *, chunk_tokens: int = CHUNK_TOKENS, autocast: Callable[[], Any] | None = None
) -> torch.Tensor:
    """The same value as `llm_trainer.token_loss_sum`, with logits computed `chunk_tokens` targets at a time."""
    from torch.utils.checkpoint import checkpoint

    lm = _causal_lm(model)
    context = autocast() if autocast is not None else contextlib.nullcontext()
    with context:
        hidden = lm.get_decoder()(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        labels = batch.labels[:, 1:]
        keep = labels != IGNORE_INDEX
        hidden, targets = hidden[:, :-1][keep], labels[keep]
        head = lm.get_output_embeddings()
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            total = total + checkpoint(_chunk_loss, head, hidden[part], targets[part], use_reentrant=False)
    return total


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
    """Cut the train and validation units in place."""
    data.train[:] = cut_units(data.train, max_seq_len)
    data.val[:] = cut_units(data.val, max_seq_len)


def data_seq_len(job: Any) -> int:
    """The max_seq_len to build the data with: the one this run started with (a worker restarted after the
    ladder lowered max_seq_len cuts the same units instead of rebuilding different ones)."""
    from loratui.train.oom_record import read_record

    started = (read_record(job.run.path).get("started") or {}) if job.run is not None else {}
    current = int(job.resolved.config.max_seq_len)
    return max(current, int(started.get("max_seq_len") or current))


def llm_rung_applier(model: Any, data: LLMData, settings: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """The callback `RecoveringStep` calls with a rung's changes; keeps the checkpoint `settings` current."""

    def apply(changes: dict[str, Any]) -> bool:
        if changes.get("chunked_loss") and not supports_chunked_loss(model):
            return False
        if changes.get("gradient_checkpointing"):
            lm = _causal_lm(model)
            with warnings.catch_warnings():  # transformers 5 renames it; the trainer's setup uses this name too
                warnings.simplefilter("ignore", FutureWarning)
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            lm.enable_input_require_grads()
        if "max_seq_len" in changes:
            cut_data(data, int(changes["max_seq_len"]))
        settings.update({k: v for k, v in changes.items() if k in settings})
        return True

    return apply
