"""The token loss of a causal language model: in full, a chunk of tokens at a time, or fused (Liger, CUDA).

`causal_loss_sum` is what the trainer, the memory planner's reference step and the real-step meter call. With
`chunked_loss: true` (the default) the decoder's hidden states go through the output head and the cross-entropy
a chunk of target tokens at a time (`chunk_count`), each chunk recomputed in backward (`torch.utils.checkpoint`), so only one
chunk's logits exist at any moment and the model never computes the full `tokens x vocab` logits. On CUDA, when
`liger-kernel` is installed (`pip install "loratui[liger]"`), Liger's fused linear cross-entropy does the same
job with its own kernels; everywhere else, or when the package is missing, the portable chunked path runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
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


VOCAB_PER_CHUNK = 4096  # chunks per step = vocabulary / 4096: 32 at 128k, 8 at 32k, 1 for tiny vocabularies


def chunk_count(vocab: int) -> int:
    """Chunks the target tokens of a micro-batch are split into. At any moment one chunk's logits exist: about
    4,096 logits per target token, whatever the vocabulary, so the loss's memory grows with the tokens like
    any other activation (and the memory planner's fit in tokens stays exact)."""
    return max(1, -(-vocab // VOCAB_PER_CHUNK))


def causal_lm(model: Any) -> Any:
    """The transformers CausalLM inside PEFT/accelerate wrappers."""
    inner = getattr(model, "module", model)  # DDP
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def is_fsdp_sharded(model: Any) -> bool:
    """Whether FSDP (`fully_shard`) wraps the model: its root gathers the LM head only inside the model's forward."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(getattr(model, "module", model), FSDPModule)


def supports_chunked_loss(model: Any) -> bool:
    """Plain `lm_head(hidden)` logits only (no logit soft-capping or scaling in the model's forward), and not
    under FSDP (the chunked loss calls the LM head outside the model's forward, where FSDP has not gathered it)."""
    if is_fsdp_sharded(model):
        return False
    lm = causal_lm(model)
    config = getattr(lm, "config", None)
    special = any(getattr(config, name, None) for name in ("final_logit_softcapping", "logit_scale"))
    return hasattr(lm, "get_decoder") and lm.get_output_embeddings() is not None and not special


def liger_installed() -> bool:
    """Whether `liger-kernel` can be imported (its fused linear cross-entropy)."""
    return importlib.util.find_spec("liger_kernel") is not None


def loss_backend(model: Any, device: Any, chunked: bool) -> str:
    """Which loss runs: "full" (every logit at once), "liger" (fused, CUDA with liger-kernel installed, plain
    output head) or "chunked" (the portable path). Models whose logits are soft-capped or scaled in their
    forward (see `supports_chunked_loss`) always take "full"."""
    if not chunked or not supports_chunked_loss(model):
        return "full"
    head = causal_lm(model).get_output_embeddings()
    plain_head = type(head) is torch.nn.Linear  # not LoRA-wrapped: Liger needs the bare weight
    if getattr(device, "type", str(device)) == "cuda" and plain_head and liger_installed():
        return "liger"
    return "chunked"


def causal_loss_sum(
    model: Any, batch: Batch, *, chunked: bool, autocast: Callable[[], Any] | None = None
) -> torch.Tensor:
    """The token-loss sum of a batch by the backend `loss_backend` picks (same value on every path)."""
    backend = loss_backend(model, batch.input_ids.device, chunked)
    if backend == "full":
        return token_loss_sum(model, batch)
    return chunked_token_loss_sum(model, batch, autocast=autocast, fused=backend == "liger")


def _liger_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Liger's fused linear cross-entropy (logits computed and freed block by block inside its kernels)."""
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(reduction="sum")(head.weight, hidden, targets, head.bias)
    return loss.float()


def _target_rows(hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states, labels) of the target tokens, one row each. On the meta device (the memory planner's
    trace), where a boolean mask cannot be evaluated, every token after the first is a target (traced rows are
    full); the copy has the same size."""
    labels = labels[:, 1:]
    if hidden.is_meta:
        return hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    return hidden[:, :-1][keep], labels[keep]


def _chunk_loss(head: Any, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), labels, reduction="sum")


def chunked_token_loss_sum(
    model: Any,
    batch: Batch,
    *,
    chunk_tokens: int | None = None,
    autocast: Callable[[], Any] | None = None,
    fused: bool = False,
) -> torch.Tensor:
    """The same value as `token_loss_sum`, with logits computed `chunk_tokens` targets at a time (default: the
    targets split into `chunk_count(vocab)` chunks), or by Liger's fused kernel with `fused`. The decoder is called directly:
    no full logits are ever computed."""
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
        hidden, targets = _target_rows(hidden, batch.labels)
        head = lm.get_output_embeddings()
        if fused:
            return _liger_loss(head, hidden, targets)
        total = hidden.new_zeros((), dtype=torch.float32)
        chunk_tokens = chunk_tokens or max(1, -(-targets.numel() // chunk_count(int(head.weight.shape[0]))))
        for start in range(0, targets.numel(), chunk_tokens):
            part = slice(start, start + chunk_tokens)
            total = total + checkpoint(_chunk_loss, head, hidden[part], targets[part], use_reentrant=False)
    return total
