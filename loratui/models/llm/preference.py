"""Preference losses (DPO, IPO, conservative DPO, ORPO) on per-sequence log-probabilities.

The formulas, per pair of a prompt x with a chosen answer y_w and a rejected answer y_l:

- DPO (Rafailov et al. 2023, "Direct Preference Optimization", arXiv:2305.18290, eq. 7), `sigmoid`:
  h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)) with sequence log-probabilities
  (sums over the answer tokens); loss = -log sigmoid(beta * h).
- Conservative DPO / label smoothing (Mitchell 2023, "A note on DPO with noisy preferences"; the `cDPO` of
  TRL and LLaMA-Factory): the labels are flipped with probability eps,
  loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h).
- IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences",
  arXiv:2310.12036, eq. 17), `ipo`: loss = (h' - 1 / (2 * beta))^2, where h' uses log-probabilities averaged
  over each answer's tokens (the length normalisation TRL uses and the IPO authors confirmed).
- ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model",
  arXiv:2403.07691, eqs. 4-7): with P = exp(mean token log-prob) and odds(y) = P / (1 - P),
  loss = NLL(y_w) + lambda * -log sigmoid(log odds(y_w) - log odds(y_l)); no reference model.

- KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization", arXiv:2402.01306,
  eq. 8), for single answers labelled desirable or not: with r = log pi(y|x) - log ref(y|x) and z0 =
  max(0, KL estimate) (detached), loss = w_D * (1 - sigmoid(beta * (r - z0))) for a desirable answer and
  w_U * (1 - sigmoid(beta * (z0 - r))) for an undesirable one. The KL estimate is the mean of
  log pi(y'|x) - log ref(y'|x) over the step's examples, each with a mismatched answer y' (as TRL does).

The implicit rewards logged (as TRL and LLaMA-Factory do): DPO beta * (log pi - log ref) per answer; ORPO
lambda * mean token log-prob per answer. `accuracy` is the share of pairs whose chosen reward is higher.

TRL (1.16) computes these losses inside `DPOTrainer._compute_loss` and `ORPOTrainer.odds_ratio_loss`,
both methods that read the trainer's own state (`self.beta`, `self.accelerator`), so they are not callable
without TRL's Trainer; the formulas are therefore written out here (and tested against hand-computed values).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from loratui.models.llm.batches import Batch
from loratui.models.llm.chat import IGNORE_INDEX
from loratui.models.llm.loss import causal_lm, chunk_count

DPO_LOSSES = ("sigmoid", "ipo")


@dataclass
class PairLosses:
    """Per-pair losses (with gradient) and detached per-pair rewards for the events."""

    loss: torch.Tensor  # (pairs,)
    chosen_rewards: torch.Tensor  # (pairs,)
    rejected_rewards: torch.Tensor  # (pairs,)
    extra: dict[str, torch.Tensor]  # per-pair extras logged as they are (e.g. ORPO's log odds ratio)


def dpo_losses(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PairLosses:
    """DPO (`sigmoid`, with optional label smoothing) or IPO losses from summed answer log-probabilities.

    `chosen_tokens`/`rejected_tokens` (answer token counts) are needed by `ipo` (length-normalised)."""
    chosen_ratio = policy_chosen.float() - reference_chosen.float()
    rejected_ratio = policy_rejected.float() - reference_rejected.float()
    if loss_type == "sigmoid":
        h = beta * (chosen_ratio - rejected_ratio)
        loss = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("ipo needs the answer token counts")
        h = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use one of {', '.join(DPO_LOSSES)}")
    return PairLosses(loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach(), {})


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_losses(
    chosen_mean_logp: torch.Tensor, rejected_mean_logp: torch.Tensor, *, lam: float
) -> PairLosses:
    """ORPO losses from each answer's mean token log-probability (the chosen NLL plus the odds-ratio term)."""
    chosen, rejected = chosen_mean_logp.float(), rejected_mean_logp.float()
    # keep log P strictly below 0 so that log(1 - P) stays finite
    tiny = torch.finfo(torch.float32).tiny
    chosen_c, rejected_c = chosen.clamp(max=-tiny), rejected.clamp(max=-tiny)
    log_odds = (chosen_c - rejected_c) - (log1mexp(chosen_c) - log1mexp(rejected_c))
    odds_term = -F.logsigmoid(log_odds)
    loss = -chosen + lam * odds_term
    return PairLosses(
        loss,
        lam * chosen.detach(),
        lam * rejected.detach(),
        {"log_odds_ratio": log_odds.detach(), "nll": -chosen.detach()},
    )


def kto_losses(
    policy: torch.Tensor,
    reference: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> PairLosses:
    """KTO losses from summed answer log-probabilities; `desirable` is a bool per row, `kl` the (detached) KL
    estimate. Rewards of the other kind are nan (a row is either a chosen or a rejected answer)."""
    ratio = policy.float() - reference.float()
    z0 = kl.detach().float().clamp(min=0)
    loss = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (ratio - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - ratio))),
    )
    rewards = beta * ratio.detach()
    nan = torch.full_like(rewards, float("nan"))
    return PairLosses(
        loss,
        torch.where(desirable, rewards, nan),
        torch.where(desirable, nan, rewards),
        {"kl": z0.expand_as(rewards)},
    )


# --- per-sequence log-probabilities ---------------------------------------------------------------------


@dataclass
class SequenceLogps:
    """Summed log-probability of each row's target tokens, and how many targets each row has."""

    logps: torch.Tensor  # (rows,) fp32
    tokens: torch.Tensor  # (rows,) fp32 counts

    def mean(self) -> torch.Tensor:
        return self.logps / self.tokens.clamp(min=1)


def _token_logps(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -F.cross_entropy(head(hidden).float(), targets, reduction="none")


def sequence_logps(
    model: Any,
    batch: Batch,
    *,
    chunked: bool = False,
    chunk_tokens: int | None = None,
    autocast: Callable[[], Any] | None = None,
) -> SequenceLogps:
    """Per-row sums of target-token log-probabilities (labels != -100, shifted by one as in the token loss).

    `chunked` computes the logits `chunk_tokens` targets at a time (default: the targets split into
    `chunk_count(vocab)` chunks; each chunk recomputed in backward), as
    `loratui.models.llm.loss.chunked_token_loss_sum` does for the SFT loss."""
    labels = batch.labels[:, 1:]
    keep = labels != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]
    targets = labels[keep]
    n_rows = batch.input_ids.shape[0]
    tokens = keep.sum(dim=1).float()
    if not chunked:
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits[:, :-1][keep]
        token_logps = -F.cross_entropy(logits.float(), targets, reduction="none")
    else:
        from torch.utils.checkpoint import checkpoint

        lm = causal_lm(model)
        context = autocast() if autocast is not None else contextlib.nullcontext()
        with context:
            hidden = lm.get_decoder()(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                position_ids=batch.position_ids,
                use_cache=False,
            ).last_hidden_state[:, :-1][keep]
            head = lm.get_output_embeddings()
            vocab = int(head.weight.shape[0])
            chunk_tokens = chunk_tokens or max(1, -(-targets.numel() // chunk_count(vocab)))
            parts = [
                checkpoint(
                    _token_logps,
                    head,
                    hidden[start : start + chunk_tokens],
                    targets[start : start + chunk_tokens],
                    use_reentrant=False,
                )
                if torch.is_grad_enabled()
                else _token_logps(
                    head, hidden[start : start + chunk_tokens], targets[start : start + chunk_tokens]
                )
                for start in range(0, targets.numel(), chunk_tokens)
            ]
            token_logps = torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)
    sums = token_logps.new_zeros((n_rows,), dtype=torch.float32).index_add(0, rows, token_logps.float())
    return SequenceLogps(sums, tokens.to(sums.device))
