"""The LLM trainer's step for preference training (`method: dpo | orpo`).

A micro-batch is a list of pair indices: one forward over the chosen rows followed by the rejected rows
(`2 x pairs` sequences), so a pair is always scored in one forward and the OOM ladder, which splits a step's
indices into micro-batches, can never separate the two sides of a pair. The loss of each pair comes from
`loratui.models.llm.preference`; a micro-batch returns the sum of its pairs' losses divided by the pairs of the
WHOLE optimizer step, so any split into micro-batches (or processes) gives the same update.

DPO's reference is the same model: for a new LoRA the adapter is switched off (`disable_adapter()`); when
training continues an SFT adapter (`init_lora`) the reference is that adapter as it was loaded, swapped into
the LoRA tensors for the reference pass (a copy of the LoRA weights only, never of the base). The reference
pass runs under `no_grad` in eval mode (no dropout).

The step keeps each pair's rewards from its last forward; `step_fields(indices)` gives the events their
means: `reward_chosen`, `reward_rejected`, `reward_margin`, `reward_accuracy` (and ORPO's `log_odds_ratio` and
`nll_chosen`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from loratui.config import TrainConfig
from loratui.models.llm.batches import collate
from loratui.models.llm.loss import supports_chunked_loss
from loratui.models.llm.preference import PairLosses, dpo_losses, orpo_losses, sequence_logps
from loratui.models.llm.preference_data import PreferenceData

EVENT_NAMES = {"log_odds_ratio": "log_odds_ratio", "nll": "nll_chosen"}


def _peft(model: Any) -> Any:
    """The PEFT model inside accelerate/DDP wrappers."""
    return getattr(model, "module", model)


class Reference:
    """DPO's reference policy: the model as training started, computed from the policy's own weights."""

    def __init__(self, model: Any, initial: dict[str, torch.Tensor] | None) -> None:
        self.model = model
        self.initial = initial  # LoRA tensors of an `init_lora` adapter; None: the adapter switched off

    @classmethod
    def at_start(cls, cfg: TrainConfig, model: Any) -> Reference:
        """Taken right after the LoRA is set up (before a resume loads later weights)."""
        if not cfg.init_lora:
            return cls(model, None)
        initial = {n: p.detach().clone() for n, p in _peft(model).named_parameters() if p.requires_grad}
        return cls(model, initial)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        peft = _peft(self.model)
        training = peft.training
        peft.eval()
        try:
            with torch.no_grad():
                if self.initial is None:
                    with peft.disable_adapter():
                        yield
                else:
                    params = dict(peft.named_parameters())
                    saved = {n: params[n].detach().clone() for n in self.initial}
                    for name, value in self.initial.items():
                        params[name].copy_(value)
                    try:
                        yield
                    finally:
                        for name, value in saved.items():
                            params[name].copy_(value)
        finally:
            peft.train(training)


class PreferenceStep:
    """`micro_loss` for DPO/ORPO (the counterpart of the trainer's SFT `LossContext`)."""

    def __init__(
        self,
        cfg: TrainConfig,
        model: Any,
        data: PreferenceData,
        pad_id: int,
        accelerator: Any,
        reference: Reference | None,
    ) -> None:
        self.cfg, self.model, self.data, self.pad_id = cfg, model, data, pad_id
        self.accelerator = accelerator
        self.reference = reference
        self.metrics: dict[int, dict[str, float]] = {}

    def _logps(self, batch: Any) -> Any:
        chunked = bool(self.cfg.chunked_loss) and supports_chunked_loss(self.model)  # OOM ladder rung 3
        return sequence_logps(self.model, batch, chunked=chunked, autocast=self.accelerator.autocast)

    def pair_losses(self, indices: list[int]) -> PairLosses:
        """The losses and rewards of the given pairs (one forward of 2 x len(indices) sequences)."""
        pairs = [self.data.train[i] for i in indices]
        rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        batch = collate(rows, self.pad_id).to(self.accelerator.device)
        n = len(pairs)
        if self.cfg.method == "orpo":
            policy = self._logps(batch)
            mean = policy.mean()
            return orpo_losses(mean[:n], mean[n:], lam=self.cfg.orpo_lambda)
        if self.reference is None:
            raise ValueError("DPO needs a reference")
        with self.reference.active():
            ref = self._logps(batch)
        policy = self._logps(batch)
        return dpo_losses(
            policy.logps[:n],
            policy.logps[n:],
            ref.logps[:n],
            ref.logps[n:],
            beta=self.cfg.pref_beta,
            loss_type=self.cfg.pref_loss,
            label_smoothing=self.cfg.label_smoothing,
            chosen_tokens=policy.tokens[:n],
            rejected_tokens=policy.tokens[n:],
        )

    def micro_loss(self, indices: list[int], step_indices: list[int]) -> torch.Tensor:
        """Sum of the pairs' losses over the pairs of the WHOLE optimizer step."""
        losses = self.pair_losses(list(indices))
        self._remember(list(indices), losses)
        return losses.loss.sum() / max(1, len(step_indices))

    def _remember(self, indices: list[int], losses: PairLosses) -> None:
        chosen = losses.chosen_rewards.tolist()
        rejected = losses.rejected_rewards.tolist()
        extra = {EVENT_NAMES[k]: v.tolist() for k, v in losses.extra.items()}
        for row, index in enumerate(indices):
            entry = {"reward_chosen": chosen[row], "reward_rejected": rejected[row]}
            entry.update({k: v[row] for k, v in extra.items()})
            self.metrics[index] = entry  # a retried micro-batch (after an OOM) replaces its pairs' values

    def step_fields(self, indices: list[int]) -> dict[str, float]:
        """Means over the step's pairs seen by this process (then forgotten)."""
        seen = [self.metrics.pop(i) for i in indices if i in self.metrics]
        if not seen:
            return {}
        fields = {key: sum(m[key] for m in seen) / len(seen) for key in seen[0]}
        fields["reward_margin"] = fields["reward_chosen"] - fields["reward_rejected"]
        fields["reward_accuracy"] = sum(m["reward_chosen"] > m["reward_rejected"] for m in seen) / len(seen)
        return fields


def preference_fields(context: Any, indices: list[int]) -> dict[str, float]:
    """The step event's reward fields for a preference step; nothing for SFT."""
    return context.step_fields(indices) if isinstance(context, PreferenceStep) else {}


def preference_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The method and its keys, for the adapter's record of how it was trained; nothing for SFT."""
    if cfg.method == "dpo":
        keys = ("pref_beta", "pref_loss", "label_smoothing")
    elif cfg.method == "orpo":
        keys = ("orpo_lambda",)
    else:
        return {}
    return {"method": cfg.method, **{key: getattr(cfg, key) for key in keys}}
