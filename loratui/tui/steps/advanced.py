"""The settings step's "Advanced" fields as a table: one `FieldSpec` per line (adapter type, optimizer,
scheduler, regularization, masked loss, EMA, validation), and the FLUX.1 / Chroma fields (base weight storage,
block swap, T5 length, timestep sampling, guidance). No Textual here: the step builds the widgets.

A spec's `key` is a config key, except `mask_source`, which stands for masked_loss + alpha_mask (its
`changes` turn a choice into config values and `shown` reads it back).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from loratui.config.schema import BaseWeightsDtype, NetworkType, Optimizer, Scheduler, TimestepSampling

IMAGE = ("image",)
BOTH = ("image", "text")


@dataclass(frozen=True)
class FieldSpec:
    """One advanced field: config key, label, widget kind ("select", "float", "int" or "path")."""

    key: str
    label: str
    kind: str
    tasks: tuple[str, ...] = IMAGE
    choices: tuple[str, ...] = ()
    valid: Callable[[float], bool] | None = None
    problem: str = ""  # the inline message for a value that does not parse or is out of range
    placeholder: str = ""  # what an empty input shows (default: "folder" or "number")
    changes: Callable[[Any], dict[str, Any]] | None = None  # value -> config changes (default {key: value})
    shown: Callable[[Callable[[str], Any]], Any] | None = None  # get(config key) -> the value shown
    variants: tuple[str, ...] = ()  # Flux fields: the variants (dev, schnell, chroma) it applies to

    def applies_to(self, task: str) -> bool:
        return task in self.tasks


def _mask_changes(source: str) -> dict[str, Any]:
    if source == "off":
        return {"masked_loss": False, "alpha_mask": False, "mask_dir": None}
    if source == "alpha":
        return {"masked_loss": True, "alpha_mask": True, "mask_dir": None}
    return {"masked_loss": True, "alpha_mask": False}  # "folder": the mask folder field names it


def _mask_shown(get: Callable[[str], Any]) -> str:
    if not get("masked_loss"):
        return "off"
    return "alpha" if get("alpha_mask") else "folder"


ADVANCED_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("network_type", "adapter", "select", choices=get_args(NetworkType)),
    FieldSpec("optimizer", "optimizer", "select", BOTH, choices=get_args(Optimizer)),
    FieldSpec("lr_scheduler", "scheduler", "select", BOTH, choices=get_args(Scheduler)),
    FieldSpec(
        "ema_decay",
        "EMA decay",
        "float",
        valid=lambda v: 0 < v < 1,
        problem="EMA decay: a number between 0 and 1 (e.g. 0.999); empty turns EMA off",
        placeholder="off",
    ),
    FieldSpec("reg_data_dir", "reg folder", "path"),
    FieldSpec(
        "prior_loss_weight",
        "prior weight",
        "float",
        valid=lambda v: v >= 0,
        problem="prior weight: a number ≥ 0 (e.g. 1.0)",
    ),
    FieldSpec(
        "mask_source",
        "masked loss",
        "select",
        choices=("off", "alpha", "folder"),
        changes=_mask_changes,
        shown=_mask_shown,
    ),
    FieldSpec("mask_dir", "mask folder", "path"),
    FieldSpec(
        "val_split",
        "val split",
        "float",
        BOTH,
        valid=lambda v: 0 <= v < 1,
        problem="val split: a fraction from 0 up to (not including) 1, e.g. 0.1",
    ),
    FieldSpec("val_data_dir", "val folder", "path"),
)
FLUX_VARIANTS = ("dev", "schnell", "chroma")
FLUX_FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "base_weights_dtype",
        "base weights",
        "select",
        choices=get_args(BaseWeightsDtype),
        variants=FLUX_VARIANTS,
    ),
    FieldSpec(
        "blocks_to_swap",
        "blocks to swap",
        "int",
        valid=lambda v: v >= 0,
        problem="blocks to swap: a whole number ≥ 0 (0: every block stays on the GPU)",
        placeholder="0",
        variants=FLUX_VARIANTS,
    ),
    FieldSpec(
        "t5_max_length",
        "T5 tokens",
        "int",
        valid=lambda v: 1 <= v <= 512,
        problem="T5 tokens: a whole number from 1 to 512; empty: 512 for dev, 256 for schnell",
        placeholder="auto",
        variants=FLUX_VARIANTS,
    ),
    FieldSpec(
        "timestep_sampling", "timesteps", "select", choices=get_args(TimestepSampling), variants=FLUX_VARIANTS
    ),
    FieldSpec(
        "sigmoid_scale",
        "sigmoid scale",
        "float",
        valid=lambda v: v > 0,
        problem="sigmoid scale: a number > 0 (e.g. 1.0)",
        variants=FLUX_VARIANTS,
    ),
    FieldSpec(
        "discrete_flow_shift",
        "flow shift",
        "float",
        valid=lambda v: v > 0,
        problem="flow shift: a number > 0 (e.g. 3.0; used by timesteps: shift)",
        variants=FLUX_VARIANTS,
    ),
    FieldSpec(
        "guidance_scale",
        "guidance",
        "float",
        valid=lambda v: v >= 0,
        problem="guidance: a number ≥ 0 (FLUX.1-dev trains at 1.0 by default)",
        variants=("dev",),
    ),
)
FIELDS_BY_KEY = {spec.key: spec for spec in (*ADVANCED_FIELDS, *FLUX_FIELDS)}


def parse(spec: FieldSpec, text: str) -> Any:
    """The value typed into a spec's input (None for empty: back to the config/default); ValueError with
    the spec's message when it does not parse or is out of range."""
    text = text.strip()
    if not text:
        return None
    if spec.kind == "path":
        return text
    try:
        value: float | int = int(text) if spec.kind == "int" else float(text)
    except ValueError:
        raise ValueError(spec.problem or f"{spec.label}: not a number") from None
    if spec.valid is not None and not spec.valid(value):
        raise ValueError(spec.problem)
    return value


def changes_for(spec: FieldSpec, value: Any) -> dict[str, Any]:
    """The config changes one edit makes."""
    return spec.changes(value) if spec.changes else {spec.key: value}


def shown_value(spec: FieldSpec, get: Callable[[str], Any]) -> Any:
    """The value a field shows for the current config (`get`: the resolved value of a config key)."""
    return spec.shown(get) if spec.shown else get(spec.key)


def section_title(task: str) -> str:
    return "Advanced (image)" if task == "image" else "Advanced"
