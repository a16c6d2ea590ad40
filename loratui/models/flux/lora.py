"""Which modules of a Flux / Chroma model get LoRA layers (diffusers module names).

The default targets are the peers' defaults for FLUX.1 LoRAs: in every double-stream block the image and text
attention projections and both MLPs, in every single-stream block the q/k/v projections and the MLP input
(together the original `linear1`) and the output projection (`linear2`). The modulation layers (`norm1.linear`)
and the embedders stay frozen. `target_modules` picks other modules by path suffix (`to_q`, `proj_mlp`,
`ff.net.0.proj`) or path (`single_transformer_blocks.3.proj_out`); `train_text_encoder` adds kohya's CLIP
targets to CLIP-L (never to T5).

LoRA layers are PEFT's (`loratui.models.sd.lora.inject_lora`): the component names `transformer` and
`text_encoder` give checkpoint keys like ``transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight``.
"""

from __future__ import annotations

import torch

from loratui.models.sd.lora import (
    DEFAULT_TE_TARGETS,
    LoraSetupError,
    adaptable_modules,
    match_targets,
)

BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
DOUBLE_BLOCK_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
)
SINGLE_BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")
#: component names (the prefixes diffusers' FluxPipeline.load_lora_weights reads)
TRANSFORMER, CLIP = "transformer", "text_encoder"


def default_transformer_paths(paths: list[str]) -> list[str]:
    """The default targets among a transformer's module paths."""
    chosen = []
    for path in paths:
        if path.startswith("transformer_blocks."):
            suffixes = DOUBLE_BLOCK_TARGETS
        elif path.startswith("single_transformer_blocks."):
            suffixes = SINGLE_BLOCK_TARGETS
        else:
            continue
        rest = path.split(".", 2)[2] if path.count(".") >= 2 else ""
        if rest in suffixes:
            chosen.append(path)
    return chosen


def target_names(requested: list[str] | None, *, train_text_encoder: bool) -> list[str]:
    """The target names in effect (for the run's metadata)."""
    names = list(requested or sorted(set(DOUBLE_BLOCK_TARGETS + SINGLE_BLOCK_TARGETS)))
    if train_text_encoder and not requested:
        names += list(DEFAULT_TE_TARGETS)
    return names


def plan_flux_targets(
    requested: list[str] | None,
    components: dict[str, torch.nn.Module],
    *,
    train_text_encoder: bool,
) -> dict[str, list[str]]:
    """Module paths to adapt per component (`transformer`, and `text_encoder` for CLIP-L when trained).

    Requested names match the transformer's blocks (the final `proj_out` and the embedders only by full path)
    and CLIP-L's layers; a name matching nothing raises LoraSetupError with the choices."""
    paths = {name: adaptable_modules(model) for name, model in components.items()}
    block_paths = [p for p in paths[TRANSFORMER] if p.startswith(BLOCK_PREFIXES)]
    transformer_chosen: set[str] = set()
    clip_requested: list[str] = []
    unknown = []
    for target in requested or []:
        exact = [p for p in paths[TRANSFORMER] if p == target]
        found = exact or match_targets(block_paths, target)
        in_clip = CLIP in paths and bool(match_targets(paths[CLIP], target))
        transformer_chosen.update(found)
        if in_clip:
            clip_requested.append(target)
        if not found and not in_clip:
            unknown.append(target)
    if unknown:
        raise LoraSetupError(
            f"target_modules {unknown} match no Linear module of the Flux transformer; choices include "
            "to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out, ff.net.0.proj, "
            "ff.net.2, ff_context.net.0.proj, ff_context.net.2, proj_mlp, proj_out, norm1.linear; CLIP-L: "
            "q_proj, k_proj, v_proj, out_proj, fc1, fc2"
        )
    plan = {TRANSFORMER: sorted(transformer_chosen) or default_transformer_paths(paths[TRANSFORMER])}
    if not plan[TRANSFORMER]:
        raise LoraSetupError(
            "target_modules choose only text-encoder layers; add transformer targets (e.g. to_q)"
        )
    if train_text_encoder and CLIP in paths:
        targets = clip_requested or list(DEFAULT_TE_TARGETS)
        plan[CLIP] = sorted({p for t in targets for p in match_targets(paths[CLIP], t)})
    return plan
