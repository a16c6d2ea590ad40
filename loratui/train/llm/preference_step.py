"""The LLM trainer's step for preference training (`method: dpo | orpo | kto`).

A micro-batch is a list of pair indices: one forward over the chosen rows followed by the rejected rows
(`2 x pairs` sequences), so a pair is always scored in one forward and the OOM ladder, which splits a step's
indices into micro-batches, can never separate the two sides of a pair. The loss of each pair comes from
`loratui.models.llm.preference`; a micro-batch returns the sum of its pairs' losses divided by the pairs of the
WHOLE optimizer step, so any split into micro-batches (or processes) gives the same update.

DPO's reference is the same model: for a new LoRA the adapter is switched off (`disable_adapter()`); when
training continues an SFT adapter (`init_lora`) the reference is that adapter as it was loaded, swapped into
the LoRA tensors for the reference pass (a copy of the LoRA weights only, never of the base). The reference
pass runs under `no_grad` in eval mode (no dropout).

KTO's rows are single answers labelled desirable or not (a pair gives one of each); its KL estimate is computed
once per optimizer step over all the step's examples, without gradients, so it too is the same for any split.

The step keeps each pair's rewards from its last forward; `step_fields(indices)` gives the events their
means: `reward_chosen`, `reward_rejected`, `reward_margin`, `reward_accuracy` (and ORPO's `log_odds_ratio` and
`nll_chosen`; KTO's `kl`, and no accuracy: its examples are not pairs).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator
from typing import Any

import torch

from loratui.config import TrainConfig
from loratui.models.llm.batches import collate
from loratui.models.llm.loss import supports_chunked_loss
from loratui.models.llm.preference import PairLosses, dpo_losses, kto_losses, orpo_losses, sequence_logps
from loratui.models.llm.preference_data import PreferenceData

EVENT_NAMES = {"log_odds_ratio": "log_odds_ratio", "nll": "nll_chosen", "kl": "kl"}


REFERENCE_METHODS = ("dpo", "kto")


def _peft(model: Any) -> Any:
    """The PEFT model inside accelerate/DDP wrappers."""
    return getattr(model, "module", model)


class Reference:
    """DPO's reference policy: the model as training started, computed from the policy's own weights."""

    def __init__(self, model: Any, initial: dict[str, torch.Tensor] | None) -> None:
        self.model = model
        self.initial = initial  # LoRA tensors of an `init_lora` adapter; None: the adapter switched off

    @classmethod
    def at_start(cls, cfg: TrainConfig, model: Any) -> Reference | None:
        """Taken right after the LoRA is set up (before a resume loads later weights); None for the methods
        without a reference (sft, orpo)."""
        if cfg.method not in REFERENCE_METHODS:
            return None
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
    """`micro_loss` for DPO/ORPO/KTO (the counterpart of the trainer's SFT `LossContext`)."""

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
        self._kl: tuple[list[int], torch.Tensor] | None = (
            None  # KTO: (the step's index list, its KL estimate)
        )

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

    def kto_losses(self, indices: list[int], step_indices: list[int]) -> PairLosses:
        """KTO losses of the given examples (one forward with gradients of their own answers, one without for
        the reference), with the KL estimate of the whole step."""
        examples = [self.data.train[i] for i in indices]
        batch = collate([e.own for e in examples], self.pad_id).to(self.accelerator.device)
        kl = self.kl_estimate(step_indices)
        if self.reference is None:
            raise ValueError("KTO needs a reference")
        with self.reference.active():
            ref = self._logps(batch)
        policy = self._logps(batch)
        desirable = torch.tensor([e.desirable for e in examples], device=policy.logps.device)
        return kto_losses(
            policy.logps,
            ref.logps,
            desirable,
            kl,
            beta=self.cfg.pref_beta,
            desirable_weight=self.cfg.kto_desirable_weight,
            undesirable_weight=self.cfg.kto_undesirable_weight,
        )

    def kl_estimate(self, step_indices: list[int]) -> torch.Tensor:
        """KTO's KL estimate: the mean over the WHOLE step's examples of log pi - log ref on each one's
        mismatched answer, without gradients (so it is the same for any split into micro-batches or processes).
        Computed once per optimizer step: the loop passes each step a new index list, and a retried step
        (after an out-of-memory error) the same one."""
        if self._kl is not None and self._kl[0] is step_indices:
            return self._kl[1]
        if self.reference is None:
            raise ValueError("KTO needs a reference")
        total = torch.zeros((), dtype=torch.float32, device=self.accelerator.device)
        for start in range(0, len(step_indices), self.cfg.batch_size):
            chunk = step_indices[start : start + self.cfg.batch_size]
            batch = collate([self.data.train[i].mismatched for i in chunk], self.pad_id).to(
                self.accelerator.device
            )
            with _without_grad_or_dropout(self.model):
                policy = self._logps(batch)
            with self.reference.active():
                ref = self._logps(batch)
            total = total + (policy.logps - ref.logps).sum()
        kl = total / max(1, len(step_indices))
        self._kl = (step_indices, kl)
        return kl

    def micro_loss(self, indices: list[int], step_indices: list[int]) -> torch.Tensor:
        """Sum of the pairs' losses over the pairs of the WHOLE optimizer step."""
        if self.cfg.method == "kto":
            losses = self.kto_losses(list(indices), step_indices)
        else:
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
            # nan: not this kind (a KTO example is either a chosen or a rejected answer)
            entry = {k: v for k, v in entry.items() if not math.isnan(v)}
            self.metrics[index] = entry  # a retried micro-batch (after an OOM) replaces its pairs' values

    def step_fields(self, indices: list[int]) -> dict[str, float]:
        """Means over the step's pairs (KTO: examples) seen by this process (then forgotten)."""
        seen = [self.metrics.pop(i) for i in indices if i in self.metrics]
        keys = list(dict.fromkeys(key for m in seen for key in m))
        fields = {key: statistics.fmean(m[key] for m in seen if key in m) for key in keys}
        if "reward_chosen" in fields and "reward_rejected" in fields:
            fields["reward_margin"] = fields["reward_chosen"] - fields["reward_rejected"]
        pairs = [m for m in seen if "reward_chosen" in m and "reward_rejected" in m]
        if pairs:
            fields["reward_accuracy"] = sum(m["reward_chosen"] > m["reward_rejected"] for m in pairs) / len(
                pairs
            )
        return fields


@contextlib.contextmanager
def _without_grad_or_dropout(model: Any) -> Iterator[None]:
    peft = _peft(model)
    training = peft.training
    peft.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        peft.train(training)


def preference_fields(context: Any, indices: list[int]) -> dict[str, float]:
    """The step event's reward fields for a preference step; nothing for SFT."""
    return context.step_fields(indices) if isinstance(context, PreferenceStep) else {}


def preference_settings(cfg: TrainConfig) -> dict[str, Any]:
    """The method and its keys, for the adapter's record of how it was trained; nothing for SFT."""
    if cfg.method == "dpo":
        keys = ("pref_beta", "pref_loss", "label_smoothing")
    elif cfg.method == "orpo":
        keys = ("orpo_lambda",)
    elif cfg.method == "kto":
        keys = ("pref_beta", "kto_desirable_weight", "kto_undesirable_weight")
    else:
        return {}
    return {"method": cfg.method, **{key: getattr(cfg, key) for key in keys}}
