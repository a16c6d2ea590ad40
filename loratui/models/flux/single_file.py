"""Flux base models from the single files users have, and the same files written from diffusers modules.

Read: the transformer in the original (BFL) layout (`flux1-dev.safetensors`, `flux1-schnell.safetensors`, a
Chroma checkpoint) or saved by diffusers, in bf16/fp16/fp32 or fp8 (float8_e4m3fn, plain or ComfyUI's scaled
fp8); the separate `ae.safetensors`, `clip_l.safetensors` and `t5xxl_*.safetensors`; or an all-in-one
checkpoint that holds them under `model.diffusion_model.`, `vae.` and `text_encoders.{clip_l,t5xxl}.`.
Every size comes from the tensors' shapes (`layout.py`), so any width loads, not only FLUX.1's.

Write: the same layouts from diffusers modules (`flux_file_states`, `save_flux_files`), for tests and exports.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from loratui.models.flux.ae_layout import ae_config_from_shapes, ae_to_diffusers, ae_to_original
from loratui.models.flux.detect import (
    FluxFileError,
    FluxFileInfo,
    missing_part,
    require_part,
    require_transformer,
)
from loratui.models.flux.layout import (
    LayoutError,
    diffusers_class_name,
    diffusers_config,
    diffusers_to_original,
    dims_from_diffusers_config,
    original_to_diffusers,
)
from loratui.models.flux.text_encoders import (
    CONFIG_METADATA,
    clip_config_from_shapes,
    clip_state,
    clip_state_for,
    load_clip_tokenizer,
    load_t5_tokenizer,
    stored_config,
    t5_config_from_shapes,
    t5_state,
)

ARCHITECTURES = {"dev": "flux1-dev", "schnell": "flux1-schnell", "chroma": "chroma"}
#: prefixes of an all-in-one checkpoint as ComfyUI saves one
ALL_IN_ONE_PREFIXES = {
    "transformer": "model.diffusion_model.",
    "vae": "vae.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "t5xxl": "text_encoders.t5xxl.transformer.",
}
SCALED_FP8_SUFFIXES = (".scale_weight", ".scale_input")


def architecture(variant: str) -> dict[str, Any]:
    """The shipped architecture config of a variant (`configs/<name>.json`)."""
    name = ARCHITECTURES[variant]
    text = resources.files("loratui.models.flux").joinpath("configs", f"{name}.json").read_text("utf-8")
    return json.loads(text)


# --- reading tensors ---------------------------------------------------------------------------------------


def read_part(
    info: FluxFileInfo, prefix: str, *, exclude: tuple[str, ...] = (), dtype: Any = None
) -> dict[str, Any]:
    """The tensors under `prefix` (prefix removed), ComfyUI's scaled fp8 weights multiplied out (in `dtype`,
    default float32)."""
    from safetensors import safe_open

    keys = [k for k in info.keys if k.startswith(prefix) and not k.startswith(exclude)]
    state: dict[str, Any] = {}
    with safe_open(str(info.path), framework="pt", device="cpu") as handle:
        for key in keys:
            state[key[len(prefix) :]] = handle.get_tensor(key)
    return dequantize_scaled_fp8(state, dtype)


def dequantize_scaled_fp8(state: dict[str, Any], dtype: Any = None) -> dict[str, Any]:
    """Weights stored as fp8 with a per-tensor `.scale_weight` (ComfyUI's scaled fp8) as products in `dtype`
    (computed in float32 one tensor at a time; default float32); the scale tensors and the `scaled_fp8` marker
    are dropped. Other state dicts come back unchanged."""
    import torch

    scales = [k for k in state if k.endswith(".scale_weight")]
    if not scales and "scaled_fp8" not in state:
        return state
    out = {k: v for k, v in state.items() if not k.endswith(SCALED_FP8_SUFFIXES) and k != "scaled_fp8"}
    for key in scales:
        weight_key = key[: -len(".scale_weight")] + ".weight"
        if weight_key in out:
            product = out[weight_key].to(torch.float32) * state[key].to(torch.float32)
            out[weight_key] = product.to(dtype or torch.float32)
    return out


def _cast(state: dict[str, Any], dtype: Any, *, keep_fp8: bool = False) -> dict[str, Any]:
    """Floating tensors in `dtype`; with `keep_fp8`, float8 matrices stay as stored.

    Empties `state` as it goes, so that a stored tensor is freed as soon as its last piece is cast (an fp8
    file upcast to bf16 peaks near the bf16 size, not bf16 + fp8)."""
    import torch

    out = {}
    for key in list(state):
        tensor = state.pop(key)
        is_fp8 = tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
        if keep_fp8 and is_fp8 and tensor.ndim >= 2:
            out[key] = tensor
        elif tensor.is_floating_point():
            out[key] = tensor.to(dtype)
        else:
            out[key] = tensor
    return out


def _empty(cls: Any, config: Any) -> Any:
    """A module with its parameters on the meta device (filled by `load_state_dict(assign=True)`)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls(config) if not isinstance(config, dict) else cls(**config)


def _fill(module: Any, state: dict[str, Any], what: str, path: Path) -> Any:
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise FluxFileError(f"{what} in {path} does not fit its architecture ({detail})")
    return module.eval()


# --- loading the parts --------------------------------------------------------------------------------------


def load_transformer(info: FluxFileInfo, *, dtype: Any, fp8_weights: bool = False) -> Any:
    """The diffusers transformer from a transformer (or all-in-one) file.

    `fp8_weights`: float8 matrices of an fp8 file stay float8_e4m3fn (for the fp8 base path, which upcasts per
    layer); everything else, and every tensor of a bf16/fp16 file, is cast to `dtype`."""
    import diffusers

    others = ("vae.", "first_stage_model.", "text_encoders.", "scaled_fp8") if not info.prefix else ()
    state = read_part(info, info.prefix, exclude=others, dtype=dtype)
    if info.dims is None:
        raise FluxFileError(f"{info.path} is not a Flux transformer")
    dims = info.dims
    stored = stored_config(info.metadata, "transformer")
    try:
        if info.layout == "original":
            state = original_to_diffusers(state, dims)
        config = diffusers_config(dims, stored.get("axes_dims_rope"))
    except LayoutError as exc:
        raise FluxFileError(f"{info.path}: {exc}") from exc
    cls = getattr(diffusers, diffusers_class_name(dims))
    model = _empty(cls, config)
    return _fill(model, _cast(state, dtype, keep_fp8=fp8_weights), "the transformer", info.path)


def load_vae(info: FluxFileInfo, *, dtype: Any, variant: str) -> Any:
    import diffusers

    prefix = info.parts["vae"]
    state = read_part(info, prefix, dtype=dtype)
    if "encoder.conv_in.weight" not in state:
        raise FluxFileError(f"vae: {info.path} holds no encoder.conv_in weights under {prefix!r}")
    diffusers_layout = any(k.startswith("encoder.down_blocks.") for k in state)
    original = state if not diffusers_layout else ae_to_original(state)
    base = stored_config(info.metadata, "vae") or architecture(variant)["vae"]
    config = ae_config_from_shapes(original, base)
    model = _empty(diffusers.AutoencoderKL, config)
    return _fill(model, _cast(ae_to_diffusers(original), dtype), "the autoencoder", info.path)


def _embedding_rows(info: FluxFileInfo, part: str, names: tuple[str, ...]) -> int:
    """Vocabulary rows of a text encoder's embedding, from the header (no weights read)."""
    prefix = info.parts[part]
    for name in names:
        entry = info.header.get(prefix + name)
        if isinstance(entry, dict):
            return int(entry["shape"][0])
    raise FluxFileError(f"{part}: {info.path} has no token embedding ({names[0]})")


CLIP_EMBEDDINGS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
T5_EMBEDDINGS = ("shared.weight", "encoder.embed_tokens.weight")


def clip_tokenizer_for(info: FluxFileInfo, places: list[Path]) -> Any:
    return load_clip_tokenizer(places, _embedding_rows(info, "clip_l", CLIP_EMBEDDINGS))


def t5_tokenizer_for(info: FluxFileInfo, places: list[Path], max_length: int) -> Any:
    return load_t5_tokenizer(places, _embedding_rows(info, "t5xxl", T5_EMBEDDINGS), max_length)


def load_clip(info: FluxFileInfo, *, dtype: Any) -> Any:
    import transformers

    state = clip_state(read_part(info, info.parts["clip_l"], dtype=dtype))
    base = stored_config(info.metadata, "clip_l") or architecture("dev")["text_encoder"]["config"]
    config = transformers.CLIPTextConfig(**clip_config_from_shapes(state, base))
    model = _empty(transformers.CLIPTextModel, config)
    return _fill(model, _cast(clip_state_for(model, state), dtype), "the CLIP-L encoder", info.path)


def load_t5(info: FluxFileInfo, *, dtype: Any) -> Any:
    import transformers

    state = t5_state(read_part(info, info.parts["t5xxl"], dtype=dtype))
    base = stored_config(info.metadata, "t5xxl") or architecture("dev")["text_encoder_2"]["config"]
    config = transformers.T5Config(**t5_config_from_shapes(state, base))
    model = _empty(transformers.T5EncoderModel, config)
    return _fill(model, _cast(state, dtype), "the T5-XXL encoder", info.path)


def _part_source(transformer: FluxFileInfo, part: str, given: str | Path | None) -> FluxFileInfo:
    if given:
        return require_part(given, part)
    if part in transformer.parts:
        return transformer
    raise missing_part(part, transformer.path, transformer.variant or "dev")


def load_flux_single_file(
    transformer_path: str | Path,
    *,
    vae: str | Path | None = None,
    clip_l: str | Path | None = None,
    t5xxl: str | Path | None = None,
    dtype: Any = None,
    device: Any = "cpu",
    fp8_weights: bool = False,
) -> Any:
    """`FluxParts` from a single-file transformer (or all-in-one checkpoint) and the separate files.

    `vae`, `clip_l`, `t5xxl` name separate files; a part left out is taken from the transformer file when it
    holds it (all-in-one), else `FluxFileError` says which file is needed and where it usually comes from.
    Every part and both tokenizers are found before any weights are read. Modules are frozen, in eval mode,
    on `device`."""
    import diffusers
    import torch

    from loratui.models.flux.parts import FluxParts

    dtype = dtype or torch.float32
    info = require_transformer(transformer_path)
    variant = info.variant or "dev"
    chroma = variant == "chroma"
    sources = {"vae": _part_source(info, "vae", vae), "t5xxl": _part_source(info, "t5xxl", t5xxl)}
    if not chroma:
        sources["clip_l"] = _part_source(info, "clip_l", clip_l)
    places = list(dict.fromkeys(s.path.parent for s in (*sources.values(), info)))
    arch = architecture(variant)
    t5_tokenizer = t5_tokenizer_for(sources["t5xxl"], places, arch["t5_max_length"])
    clip_tokenizer = None if chroma else clip_tokenizer_for(sources["clip_l"], places)
    transformer = load_transformer(info, dtype=dtype, fp8_weights=fp8_weights)
    vae_model = load_vae(sources["vae"], dtype=dtype, variant=variant)
    t5 = load_t5(sources["t5xxl"], dtype=dtype)
    clip = None if chroma else load_clip(sources["clip_l"], dtype=dtype)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(arch["scheduler"]["config"])
    parts = FluxParts(
        variant=variant,
        transformer=transformer,
        vae=vae_model,
        t5=t5,
        t5_tokenizer=t5_tokenizer,
        clip=clip,
        clip_tokenizer=clip_tokenizer,
        scheduler=scheduler,
        source=f"{info.path} (single file)",
    )
    for module in parts.modules().values():
        module.requires_grad_(False)
        module.to(device)
    return parts


# --- writing ---------------------------------------------------------------------------------------------------


def _fp8(state: dict[str, Any]) -> dict[str, Any]:
    """Matrices as float8_e4m3fn (how fp8 Flux files store them); vectors as they are."""
    import torch

    return {
        k: (v.to(torch.float8_e4m3fn) if v.ndim >= 2 and v.is_floating_point() else v)
        for k, v in state.items()
    }


def transformer_file_state(transformer: Any, *, fp8: bool = False) -> dict[str, Any]:
    """A diffusers Flux/Chroma transformer's weights in the original (BFL) layout."""
    dims = dims_from_diffusers_config(transformer.config)
    state = diffusers_to_original(
        {k: v.detach().contiguous() for k, v in transformer.state_dict().items()}, dims
    )
    state = {k: v.contiguous() for k, v in state.items()}
    return _fp8(state) if fp8 else state


def flux_file_states(
    transformer: Any, vae: Any, clip: Any | None, t5: Any, *, fp8: bool = False
) -> dict[str, tuple[dict[str, Any], dict[str, str]]]:
    """part -> (state dict, metadata) of the files users have: transformer (original layout), vae (`ae`
    layout), clip_l and t5xxl (transformers names). `fp8`: transformer and T5 matrices in float8_e4m3fn."""

    def meta(part: str, config: Any) -> dict[str, str]:
        plain = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        return {f"{CONFIG_METADATA}.{part}": json.dumps(plain, default=list)}

    out = {
        "transformer": (
            transformer_file_state(transformer, fp8=fp8),
            meta("transformer", transformer.config),
        ),
        "vae": (ae_to_original(vae.state_dict()), meta("vae", vae.config)),
        "t5xxl": (
            _fp8(_plain(t5.state_dict())) if fp8 else _plain(t5.state_dict()),
            meta("t5xxl", t5.config.to_diff_dict()),
        ),
    }
    if clip is not None:
        clip_file = {f"text_model.{k}": v for k, v in clip_state(_plain(clip.state_dict())).items()}
        out["clip_l"] = (clip_file, meta("clip_l", clip.config.to_diff_dict()))
    return out


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    """Contiguous tensors without shared storage (safetensors refuses tied tensors)."""
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def save_flux_files(
    folder: Path,
    transformer: Any,
    vae: Any,
    clip: Any | None,
    t5: Any,
    *,
    names: dict[str, str] | None = None,
    fp8: bool = False,
    all_in_one: str | None = None,
) -> dict[str, Path]:
    """Write the separate files (`flux1.safetensors`, `ae.safetensors`, `clip_l.safetensors`,
    `t5xxl_fp16.safetensors` unless `names` says otherwise) or, with `all_in_one`, one checkpoint holding all
    parts under ComfyUI's prefixes. Returns part -> path."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    states = flux_file_states(transformer, vae, clip, t5, fp8=fp8)
    if all_in_one:
        merged: dict[str, Any] = {}
        metadata: dict[str, str] = {}
        for part, (state, meta) in states.items():
            merged.update({ALL_IN_ONE_PREFIXES[part] + k: v for k, v in state.items()})
            metadata.update(meta)
        path = folder / all_in_one
        save_file(merged, str(path), metadata=metadata)
        return {part: path for part in states}
    default = {
        "transformer": "flux1.safetensors",
        "vae": "ae.safetensors",
        "clip_l": "clip_l.safetensors",
        "t5xxl": "t5xxl_fp8_e4m3fn.safetensors" if fp8 else "t5xxl_fp16.safetensors",
    }
    default.update(names or {})
    paths = {}
    for part, (state, meta) in states.items():
        paths[part] = folder / default[part]
        save_file(state, str(paths[part]), metadata=meta)
    return paths


def write_single_files_from_folder(
    folder: Path, dest: Path, *, fp8: bool = False, all_in_one: str | None = None
) -> dict[str, Path]:
    """The files users have, written from a diffusers FluxPipeline / ChromaPipeline folder: the transformer in
    the original layout, `ae.safetensors`, `clip_l.safetensors`, `t5xxl_*.safetensors` (or one all-in-one
    checkpoint), plus the folder's tokenizers as `clip_tokenizer/` and `t5_tokenizer/` next to them."""
    import shutil

    import diffusers
    import transformers

    folder, dest = Path(folder), Path(dest)
    index = json.loads((folder / "model_index.json").read_text("utf-8"))
    chroma = str(index.get("_class_name", "")).startswith("Chroma")
    t5_name, t5_tok = ("text_encoder", "tokenizer") if chroma else ("text_encoder_2", "tokenizer_2")
    transformer_cls = diffusers.ChromaTransformer2DModel if chroma else diffusers.FluxTransformer2DModel
    transformer = transformer_cls.from_pretrained(folder / "transformer")
    vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae")
    t5 = transformers.T5EncoderModel.from_pretrained(folder / t5_name)
    clip = None if chroma else transformers.CLIPTextModel.from_pretrained(folder / "text_encoder")
    paths = save_flux_files(dest, transformer, vae, clip, t5, fp8=fp8, all_in_one=all_in_one)
    shutil.copytree(folder / t5_tok, dest / "t5_tokenizer", dirs_exist_ok=True)
    if not chroma:
        shutil.copytree(folder / "tokenizer", dest / "clip_tokenizer", dirs_exist_ok=True)
    return paths
