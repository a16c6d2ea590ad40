"""The token loss of a causal language model, in full or a chunk of tokens at a time."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from loratui.models.llm.batches import Batch
from loratui.models.llm.chat import IGNORE_INDEX


def token_loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Sum of the cross-entropy of every target token in the batch (fp32)."""
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    labels = batch.labels[:, 1:]
    keep = labels != IGNORE_INDEX
    logits = out.logits[:, :-1][keep]
    return F.cross_entropy(logits.float(), labels[keep], reduction="sum")


CHUNK_TOKENS = 1024


def causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside PEFT/accelerate wrappers."""
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def supports_chunked_loss(model: Any) -> bool:
    """Plain `lm_head(hidden)` logits only (no logit soft-capping or scaling in the model's forward)."""
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    special = any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    return hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None and not special


def _chunk_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_token_loss_sum(
    model: Any, batch: Batch, *, chunk_tokens: int = CHUNK_TOKENS, autocast: Callable[[], Any] | None = None
) -> torch.Tensor:
    """The same value as `token_loss_sum`, with logits computed `chunk_tokens` targets at a time."""
    from torch.utils.checkpoint import checkpoint

    lm = causal_lm(model)
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
