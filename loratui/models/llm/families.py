"""Which modules of a causal LM get a LoRA: the default targets per model family, MoE experts, clear refusals.

Pure Python (no torch import), so the memory planner chooses exactly what the trainer chooses from an
architecture summary. The inputs are the *short* names of the model's `nn.Linear` modules (`q_proj`), the name
of its output layer (`lm_head`, never adapted by default) and its fused 3-D expert weights, named by their
module and parameter (`experts.gate_up_proj`; transformers 5 stores the experts of an MoE block as one
`(experts, out, in)` tensor instead of one `nn.Linear` per expert).

Defaults: every linear layer of attention and MLP (the same as `all-linear`); on MoE models also the fused
expert weights through PEFT's `target_parameters` (PEFT cannot apply dropout there, so with `lora_dropout > 0`
they are left out and a warning says so). The router (`gate`) is never adapted.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

LLAMA_STYLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PHI3_STYLE = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
#: linear layers that route tokens to experts: never adapted by default or by `all-linear`
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")
ALL_LINEAR = "all-linear"
#: a `target_modules` entry meaning "every fused expert weight"
EXPERTS = "experts"


@dataclass(frozen=True)
class Family:
    """A model family verified by loratui's tests (tiny fixtures of the real architecture)."""

    name: str
    model_types: tuple[str, ...]
    targets: tuple[str, ...]
    chat_format: str
    moe: bool = False


FAMILIES: tuple[Family, ...] = (
    Family("Llama 3.x", ("llama",), LLAMA_STYLE, "Llama 3 headers (<|start_header_id|> ... <|eot_id|>)"),
    Family("Mistral / Mistral-Nemo", ("mistral",), LLAMA_STYLE, "[INST] ... [/INST] answer</s>"),
    Family("Qwen2 / Qwen2.5", ("qwen2",), LLAMA_STYLE, "ChatML (<|im_start|> ... <|im_end|>)"),
    Family("Qwen3", ("qwen3",), LLAMA_STYLE, "ChatML with <think> blocks"),
    Family("Qwen3-MoE", ("qwen3_moe",), LLAMA_STYLE, "ChatML with <think> blocks", moe=True),
    Family("Gemma 2", ("gemma2",), LLAMA_STYLE, "<start_of_turn>user/model ... <end_of_turn>"),
    Family("Gemma 3 (text)", ("gemma3_text",), LLAMA_STYLE, "<start_of_turn>user/model ... <end_of_turn>"),
    Family("Phi-3 / Phi-4", ("phi3",), PHI3_STYLE, "<|user|> ... <|end|><|assistant|>"),
)


class UnsupportedArchitecture(ValueError):
    """No known LoRA target names for this model; the message says what is supported and what to set."""


@dataclass
class TargetPlan:
    """Where the LoRA goes: `modules` (short `nn.Linear` names for PEFT's `target_modules`), `parameters`
    (fused expert weights for PEFT's `target_parameters`) and notes for the run's log (level, text)."""

    modules: list[str]
    parameters: list[str] = field(default_factory=list)
    notes: list[tuple[str, str]] = field(default_factory=list)


def family_for(model_type: str | None) -> Family | None:
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def supported_summary() -> str:
    """One line naming the verified families and their model types."""
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES)


def short_name(path: str, parts: int = 1) -> str:
    """The last `parts` dot-separated components of a module path."""
    return ".".join(path.split(".")[-parts:])


def matches(path: str, target: str) -> bool:
    """PEFT's rule for a list of names: the full path, or a suffix after a dot."""
    return path == target or path.endswith("." + target)


def plan_targets(
    model_type: str | None,
    linear_paths: Iterable[str],
    expert_paths: Iterable[str],
    requested: list[str] | None,
    *,
    lora_dropout: float = 0.0,
    output_name: str = "lm_head",
) -> TargetPlan:
    """The LoRA targets of a model given the full paths of its `nn.Linear` modules and fused 3-D expert weights
    (`model.layers.0.mlp.experts.gate_up_proj`).

    `requested` is the config's `target_modules` (None: the family default; `["all-linear"]`; or names). Raises
    `UnsupportedArchitecture` when the default is asked for and the model has no known layer names, and
    `ValueError` for requested names the model does not have."""
    paths = sorted(set(linear_paths))
    linear = sorted({short_name(p) for p in paths})
    experts = sorted({short_name(p, 2) for p in expert_paths})
    if requested and ALL_LINEAR in [t.lower() for t in requested]:
        modules = [n for n in linear if n != output_name and n not in ROUTER_NAMES]
        plan = TargetPlan(modules)
        extra = [t for t in requested if t.lower() != ALL_LINEAR]  # e.g. [all-linear, lm_head]
        if extra:
            more = _explicit(extra, paths, experts, lora_dropout)
            plan.modules += [m for m in more.modules if m not in plan.modules]
            plan.parameters = more.parameters
        if not plan.parameters:
            _add_experts(plan, experts, lora_dropout)
        return plan
    if requested:
        return _explicit(requested, paths, experts, lora_dropout)
    plan = TargetPlan(_default_modules(model_type, linear, output_name))
    if family_for(model_type) is None:
        plan.notes.append(
            (
                "warning",
                f"model type {model_type!r} is not one of the verified families; LoRA goes on its layers named "
                f"{', '.join(plan.modules)} (set target_modules to choose others)",
            )
        )
    _add_experts(plan, experts, lora_dropout)
    return plan


def _default_modules(model_type: str | None, linear: list[str], output_name: str) -> list[str]:
    family = family_for(model_type)
    if family is not None:
        found = [t for t in family.targets if t in linear]
        if found:
            return found
    else:
        for style in (LLAMA_STYLE, PHI3_STYLE):
            attention = [t for t in style if t.endswith(("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj"))]
            if all(t in linear for t in attention):
                return [t for t in style if t in linear]
    others = [n for n in linear if n != output_name]
    shown = ", ".join(others[:12]) or "none"
    raise UnsupportedArchitecture(
        f"model type {model_type!r} has no known LoRA target names (its linear layers: {shown}). "
        f"Default targets are known for: {supported_summary()}. Set target_modules in the config to this "
        "model's attention/MLP linear layer names (e.g. target_modules: [" + ", ".join(others[:4]) + "]), "
        "or target_modules: all-linear"
    )


def _add_experts(plan: TargetPlan, experts: list[str], lora_dropout: float) -> None:
    if not experts:
        return
    if lora_dropout > 0:
        plan.notes.append(
            (
                "warning",
                f"MoE experts are NOT adapted: LoRA on the fused expert weights ({', '.join(experts)}) cannot use "
                f"dropout (lora_dropout is {lora_dropout}); set lora_dropout: 0 to adapt them too. Attention "
                "layers are adapted; the router stays frozen.",
            )
        )
        return
    plan.parameters = list(experts)
    plan.notes.append(
        (
            "info",
            f"MoE experts adapted: LoRA on the fused expert weights {', '.join(experts)} (one low-rank pair per "
            "expert, PEFT target_parameters); the router stays frozen",
        )
    )


def _explicit(requested: list[str], paths: list[str], experts: list[str], lora_dropout: float) -> TargetPlan:
    modules: list[str] = []
    parameters: list[str] = []
    unknown: list[str] = []
    for name in requested:
        wanted = name.strip(".")
        named = [e for e in experts if matches(e, wanted) or wanted.endswith("." + e)]
        if any(matches(p, wanted) for p in paths):
            modules.append(wanted)
        elif wanted == EXPERTS and experts:
            parameters.extend(experts)
        elif named:
            parameters.extend(named)
        else:
            unknown.append(name)
    if unknown:
        linear = sorted({short_name(p) for p in paths})
        choices = ", ".join(linear + ([EXPERTS, *experts] if experts else []))
        raise ValueError(
            f"target_modules {unknown} match no linear layer of this model; it has: {choices}. "
            "Set target_modules to some of these, or target_modules: all-linear"
        )
    plan = TargetPlan(list(dict.fromkeys(modules)), sorted(set(parameters)))
    if plan.parameters and lora_dropout > 0:
        raise ValueError(
            f"target_modules names fused MoE expert weights ({', '.join(plan.parameters)}), which PEFT adapts "
            f"without dropout: set lora_dropout: 0 (it is {lora_dropout}) or leave the experts out"
        )
    if experts and not plan.parameters:
        plan.notes.append(
            (
                "warning",
                f"MoE experts are NOT adapted: target_modules names none of the fused expert weights "
                f"({', '.join(experts)}); add '{EXPERTS}' to adapt them",
            )
        )
    return plan
