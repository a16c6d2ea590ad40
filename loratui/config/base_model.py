"""Tell what a base-model path is without loading weights: family, file kind, size class.

Reads only small things: a safetensors header (JSON), `model_index.json`, `config.json`, file magic.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

from loratui.util import jsonsafe

SD_FAMILIES = ("sd15", "sd2", "sdxl")
FLUX_FAMILIES = ("flux", "chroma")
IMAGE_FAMILIES = SD_FAMILIES + FLUX_FAMILIES
GGML_MAGICS = {b"lmgg", b"tjgg", b"fmgg", b"ggml", b"ggjt", b"ggmf"}
SAFETENSORS_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass
class ModelInfo:
    """What a base-model path looks like."""

    path: str
    kind: str  # diffusers-folder, sd-checkpoint, flux-checkpoint, hf-folder, gguf, ggml, pickle, lora, vae,
    # text-encoder, unknown, missing, hub-id
    family: str | None = None  # sd15 | sd2 | sdxl | flux | chroma | llm
    params: int | None = None  # LLM: estimate from config.json; Flux: transformer parameters from the headers
    architecture: str | None = None
    notes: list[str] = field(default_factory=list)
    #: what a single-file SD checkpoint's marker keys say: "v_prediction" (`v_pred` key) or None
    prediction_type: str | None = None
    #: the checkpoint carries the `ztsnr` marker (trained with the zero-terminal-SNR schedule)
    zero_terminal_snr: bool = False
    #: Flux family: dev (guidance embedding), schnell or chroma
    variant: str | None = None

    @property
    def preset_family(self) -> str | None:
        """The preset section that fits: sd15/sdxl (sd2 uses sd15's), or the LLM size class (`llm-3b` ...)."""
        if self.family in ("sd15", "sd2"):
            return "sd15"
        if self.family == "sdxl":
            return "sdxl"
        if self.family == "llm":
            from loratui.config.presets import llm_preset_family

            return llm_preset_family(self.params or params_from_name(self.path) or 0)
        return None


def params_from_name(path: str) -> float | None:
    """Parameter count written in a model's name ("Llama-2-13b-hf" -> 13e9), or None."""
    found = re.search(r"(?:^|[^a-z0-9.])(\d+(?:\.\d+)?)b(?:$|[^a-z0-9])", Path(path).name.lower())
    return float(found.group(1)) * 1e9 if found else None


def params_from_weight_files(folder: Path) -> int | None:
    """Parameters stored in a folder's .safetensors files, counted from their headers (no weights read)."""
    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError):
            return None
        for name, entry in header.items():
            if name != "__metadata__" and isinstance(entry, dict):
                count = 1
                for dim in entry.get("shape", []):
                    count *= int(dim)
                total += count
    return total or None


def read_safetensors_header(path: Path) -> dict:
    """Return the JSON header of a .safetensors file (tensor names -> dtype/shape/offsets)."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ValueError("file too short to be safetensors")
        (length,) = struct.unpack("<Q", raw)
        if length <= 1 or length > SAFETENSORS_HEADER_LIMIT:
            raise ValueError("not a safetensors file (bad header length)")
        header = handle.read(length)
        if len(header) < length:
            raise ValueError("truncated safetensors header")
    return jsonsafe.loads(header, "the safetensors header")


def unreadable_safetensors(path: Path, exc: BaseException) -> str:
    """One line for a .safetensors file that failed to load: which file, why, and what to do."""
    why = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return (
        f"{path} is not a complete .safetensors file ({why}); it may be truncated or damaged: copy or "
        "export it again"
    )


#: marker tensors of single-file SD checkpoints (NoobAI-style v-pred SDXL; A1111/Forge and ComfyUI read them):
#: `v_pred` = trained for v-prediction, `ztsnr` (next to `v_pred`) = trained with zero terminal SNR
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"


def schedule_markers(keys) -> tuple[str | None, bool]:
    """(prediction type, zero terminal SNR) that a checkpoint's marker keys declare; (None, False) without."""
    keyset = set(keys)
    if V_PRED_KEY not in keyset:
        return None, False
    return "v_prediction", ZTSNR_KEY in keyset


#: where a Flux transformer's keys start in the files users have: bare (`flux1-dev.safetensors`), ComfyUI's
#: all-in-one checkpoints (`model.diffusion_model.`) and a few re-saves
FLUX_TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.", "model.")
#: tensors that only a Flux-class transformer in the original (BFL) layout has
FLUX_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
#: the same for a transformer saved by diffusers (`diffusion_pytorch_model.safetensors` of FluxTransformer2DModel)
FLUX_DIFFUSERS_MARKERS = (
    "transformer_blocks.0.attn.add_q_proj.weight",
    "single_transformer_blocks.0.proj_mlp.weight",
)
#: Chroma's modulation approximator; FLUX.1-dev's guidance embedding (schnell has neither)
CHROMA_MARKER = "distilled_guidance_layer.in_proj.weight"
GUIDANCE_MARKERS = ("guidance_in.in_layer.weight", "time_text_embed.guidance_embedder.linear_1.weight")


def flux_prefix(keys) -> tuple[str, str] | None:
    """(prefix, layout) of a Flux transformer's keys (layout `original` or `diffusers`), or None."""
    keyset = keys if isinstance(keys, set | frozenset | dict) else set(keys)
    for prefix in FLUX_TRANSFORMER_PREFIXES:
        if any(prefix + marker in keyset for marker in FLUX_MARKERS):
            return prefix, "original"
    for prefix in ("", "transformer.", "model."):
        if any(prefix + marker in keyset for marker in FLUX_DIFFUSERS_MARKERS):
            return prefix, "diffusers"
    return None


def flux_variant(keys, prefix: str = "") -> str:
    """chroma, dev or schnell from a Flux transformer's keys (after `prefix`)."""
    keyset = keys if isinstance(keys, set | frozenset | dict) else set(keys)
    if prefix + CHROMA_MARKER in keyset:
        return "chroma"
    return "dev" if any(prefix + marker in keyset for marker in GUIDANCE_MARKERS) else "schnell"


def classify_state_keys(keys: list[str]) -> tuple[str, str | None]:
    """Classify a checkpoint by its tensor names: (kind, family)."""
    keyset = set(keys)
    if any(".lora_down." in k or ".lora_A." in k or k.startswith("lora_unet_") for k in keys[:2000]):
        return "lora", None
    found = flux_prefix(keyset)
    if found:
        return "flux-checkpoint", "chroma" if flux_variant(keyset, found[0]) == "chroma" else "flux"
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return "sd-checkpoint", "sdxl"
    if any(k.startswith("model.diffusion_model.") for k in keys):
        if any(k.startswith("cond_stage_model.model.") for k in keys):
            return "sd-checkpoint", "sd2"
        return "sd-checkpoint", "sd15"
    if "encoder.conv_in.weight" in keyset and "decoder.conv_out.weight" in keyset:
        return "vae", None
    if any(k.startswith(("model.layers.", "transformer.h.", "model.embed_tokens")) for k in keys):
        return "llm-weights", "llm"
    if any(k.startswith(("text_model.encoder.", "encoder.block.", "shared.")) for k in keys):
        return "text-encoder", None
    return "unknown", None


def _flux_file_info(path: Path, header: dict, keys: list[str], family: str) -> ModelInfo:
    """A Flux-class transformer file: variant, layout, parameters, what else the file holds."""
    prefix, layout = flux_prefix(set(keys)) or ("", "original")
    info = ModelInfo(str(path), "flux-checkpoint", family=family, variant=flux_variant(set(keys), prefix))
    inner = [k for k in keys if k.startswith(prefix) and not k.startswith(_OTHER_PARTS)]
    info.params = sum(_numel(header[k]) for k in inner) or None
    info.architecture = {"chroma": "Chroma", "dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell"}[info.variant]
    if layout == "diffusers":
        info.notes.append("transformer in diffusers layout")
    dtypes = {str(header[k].get("dtype")) for k in inner if isinstance(header[k], dict)}
    if any(d.startswith("F8") for d in dtypes):
        info.notes.append("fp8 weights")
    parts = [
        name
        for name, markers in (
            ("vae", ("vae.", "first_stage_model.")),
            ("clip_l", ("text_encoders.clip_l.",)),
            ("t5xxl", ("text_encoders.t5xxl.",)),
        )
        if any(k.startswith(markers) for k in keys)
    ]
    if parts:
        info.notes.append("also holds " + ", ".join(parts))
    return info


#: key prefixes of the other models an all-in-one checkpoint holds next to the transformer
_OTHER_PARTS = ("vae.", "first_stage_model.", "text_encoders.", "cond_stage_model.", "conditioner.")


def _numel(entry: object) -> int:
    count = 1
    for dim in entry.get("shape", []) if isinstance(entry, dict) else []:
        count *= int(dim)
    return count


#: the keys that hold each dimension, in the spellings families use (Llama, GPT-2/Bloom, OPT/T5-style)
LLM_DIMENSION_KEYS = {
    "hidden": ("hidden_size", "n_embd", "n_embed", "d_model"),
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "vocab": ("vocab_size", "padded_vocab_size"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "d_ff"),
}
#: families whose MLP is gated (three matrices) and whose embeddings are untied unless the config says otherwise
#: (Gemma ties them)
_GATED = {
    "llama",
    "mistral",
    "mixtral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
    "olmo",
    "olmo2",
}


def llm_dimension(config: dict, name: str) -> tuple[int, str] | None:
    """(value, key it was read from) of one dimension of a causal LM's config.json, or None."""
    text = config.get("text_config", config)
    for key in LLM_DIMENSION_KEYS[name]:
        try:
            value = int(text[key])
        except (KeyError, TypeError, ValueError):
            continue
        if value > 0:
            return value, key
    return None


def _llm_params(config: dict) -> int | None:
    """Rough parameter count of a decoder-only LM from its config.json (any family's key spellings)."""
    text = config.get("text_config", config)
    found = {name: llm_dimension(config, name) for name in ("hidden", "layers", "vocab")}
    if any(v is None for v in found.values()):
        return None
    hidden, layers, vocab = (found[n][0] for n in ("hidden", "layers", "vocab"))
    gated = str(text.get("model_type", "")) in _GATED or str(text.get("hidden_act", "")) in ("silu", "swish")
    inter = (llm_dimension(config, "intermediate") or (4 * hidden, ""))[0]
    heads = (llm_dimension(config, "heads") or (1, ""))[0]
    kv = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or hidden // max(heads, 1))
    attn = hidden * head_dim * (heads * 2 + kv * 2)
    mlp = (3 if gated else 2) * hidden * inter
    experts = int(
        text.get("num_experts") or text.get("num_local_experts") or text.get("n_routed_experts") or 0
    )
    if experts > 1:  # mixture of experts: every expert's weights are stored (Qwen-MoE, Mixtral, ...)
        expert_inter = int(text.get("moe_intermediate_size") or inter)
        mlp = experts * (3 if gated else 2) * hidden * expert_inter + experts * hidden
    model_type = str(text.get("model_type", ""))
    tied = bool(text.get("tie_word_embeddings", model_type.startswith("gemma") or not gated))
    return layers * (attn + mlp) + vocab * hidden * (1 if tied else 2)


def layers_from_weight_files(folder: Path) -> int | None:
    """Decoder layers stored in a folder's .safetensors files (the highest `layers.N.` / `h.N.` index + 1)."""
    highest = -1
    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            header = read_safetensors_header(path)
        except (OSError, ValueError):
            return None
        for name in header:
            found = re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", name)
            if found:
                highest = max(highest, int(found.group(1)))
    return highest + 1 if highest >= 0 else None


def _inspect_diffusers(folder: Path) -> ModelInfo:
    info = ModelInfo(str(folder), "diffusers-folder")
    index = jsonsafe.loads((folder / "model_index.json").read_text(encoding="utf-8"), "model_index.json")
    info.architecture = str(index.get("_class_name"))
    if info.architecture.startswith(("Flux", "Chroma")):
        return _inspect_flux_folder(folder, info)
    if "text_encoder_2" in index or "XL" in info.architecture:
        info.family = "sdxl"
        return info
    info.family = "sd15"
    unet_cfg = folder / "unet" / "config.json"
    sched_cfg = folder / "scheduler" / "scheduler_config.json"
    try:
        unet = jsonsafe.loads(unet_cfg.read_text(encoding="utf-8"), "unet/config.json")
        if unet.get("cross_attention_dim") == 1024 or unet.get("use_linear_projection"):
            info.family = "sd2"
        sched = jsonsafe.loads(sched_cfg.read_text(encoding="utf-8")) if sched_cfg.exists() else {}
        if sched.get("prediction_type") == "v_prediction":
            info.notes.append("v-prediction")
            info.prediction_type = "v_prediction"
        info.zero_terminal_snr = bool(sched.get("rescale_betas_zero_snr"))
    except (OSError, ValueError):
        info.notes.append("unet/config.json unreadable")
    return info


def _inspect_flux_folder(folder: Path, info: ModelInfo) -> ModelInfo:
    """A diffusers FluxPipeline / ChromaPipeline folder: variant from the transformer config, parameters from
    the transformer's weight headers."""
    chroma = info.architecture.startswith("Chroma")
    info.family = "chroma" if chroma else "flux"
    try:
        config = jsonsafe.loads(
            (folder / "transformer" / "config.json").read_text(encoding="utf-8"), "config"
        )
    except (OSError, ValueError):
        info.notes.append("transformer/config.json unreadable")
        config = {}
    info.variant = "chroma" if chroma else ("dev" if config.get("guidance_embeds") else "schnell")
    info.params = params_from_weight_files(folder / "transformer")
    return info


def _inspect_hf_folder(folder: Path) -> ModelInfo:
    config = jsonsafe.loads((folder / "config.json").read_text(encoding="utf-8"), "config.json")
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    info = ModelInfo(str(folder), "hf-folder", family="llm", architecture=str(archs[0]))
    info.params = _llm_params(config)
    if not any(folder.glob("*.safetensors")):
        if any(folder.glob("*.bin")):
            info.notes.append("weights are pickle .bin files (need --allow-pickle)")
        else:
            info.notes.append("no weight files found")
    tokenizer_files = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
    if not any((folder / name).exists() for name in tokenizer_files):
        info.notes.append("no tokenizer files")
    return info


def _inspect_gguf(path: Path) -> ModelInfo:
    from loratui.config.gguf_header import llm_config_from_gguf, read_gguf_header

    info = ModelInfo(str(path), "gguf", family="llm")
    try:
        header = read_gguf_header(path)
    except (OSError, ValueError) as exc:
        info.notes.append(f"unreadable GGUF header: {exc}")
        return info
    info.architecture = header.architecture or None
    info.params = header.params or _llm_params(llm_config_from_gguf(header))
    return info


def _inspect_file(path: Path) -> ModelInfo:
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic == b"GGUF":
        return _inspect_gguf(path)
    if magic in GGML_MAGICS or re.search(r"ggml", path.name, re.IGNORECASE):
        return ModelInfo(str(path), "ggml", family="llm")
    if suffix == ".safetensors":
        try:
            header = read_safetensors_header(path)
        except (ValueError, OSError) as exc:
            return ModelInfo(str(path), "unknown", notes=[f"unreadable safetensors: {exc}"])
        keys = [k for k in header if k != "__metadata__"]
        kind, family = classify_state_keys(keys)
        if kind == "flux-checkpoint":
            return _flux_file_info(path, header, keys, family or "flux")
        info = ModelInfo(str(path), kind, family=family)
        if kind == "sd-checkpoint":
            info.prediction_type, info.zero_terminal_snr = schedule_markers(keys)
            if info.prediction_type:
                info.notes.append("v-prediction")
        return info
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return ModelInfo(str(path), "pickle", notes=["pickle checkpoint: loading it runs code"])
    return ModelInfo(str(path), "unknown")


def inspect_base_model(base_model: str) -> ModelInfo:
    """Inspect a local path (or note that it is a hub id / missing). Never raises for bad files."""
    path = Path(base_model).expanduser()
    try:
        if path.is_dir():
            if (path / "model_index.json").exists():
                return _inspect_diffusers(path)
            if (path / "config.json").exists():
                return _inspect_hf_folder(path)
            return ModelInfo(
                str(path), "unknown", notes=["folder has neither model_index.json nor config.json"]
            )
        if path.is_file():
            return _inspect_file(path)
    except (OSError, ValueError) as exc:
        return ModelInfo(str(path), "unknown", notes=[str(exc)])
    if re.search(r"ggml", path.name, re.IGNORECASE) and path.suffix.lower() == ".bin":
        return ModelInfo(str(path), "ggml", family="llm", notes=["file not found; named like a GGML file"])
    if re.fullmatch(r"[\w.-]+/[\w.-]+", base_model) and not base_model.startswith("."):
        return ModelInfo(base_model, "hub-id")
    return ModelInfo(str(path), "missing")


def guess_family_from_name(base_model: str, task_type: str) -> str:
    """Fallback when nothing can be read: a guess from the file name."""
    if task_type == "text-generation":
        return "llm"
    name = Path(base_model).name.lower()
    if "chroma" in name:
        return "chroma"
    if "flux" in name:
        return "flux"
    if "xl" in name:
        return "sdxl"
    if re.search(r"(^|[^0-9])(v?2[-_.]?[01]|sd2)", name):
        return "sd2"
    return "sd15"


def _cached_hub_task(repo_id: str) -> str | None:
    """The task of a hub id found in the local HF cache: a diffusers pipeline or a transformers model."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for filename, task in (("model_index.json", "image-generation"), ("config.json", "text-generation")):
        if isinstance(try_to_load_from_cache(repo_id, filename), str):
            return task
    return None


def guess_task_type(base_model: str, train_data_dir: str) -> str | None:
    """Infer the task type from the model path or dataset, or None when nothing tells."""
    info = inspect_base_model(base_model) if base_model else None
    if info and info.family in IMAGE_FAMILIES:
        return "image-generation"
    if info and info.family == "llm":
        return "text-generation"
    if info and info.kind == "hub-id":
        cached = _cached_hub_task(base_model)
        if cached:
            return cached
    lowered = base_model.lower()
    if lowered.endswith((".gguf", ".bin")) or "llama" in lowered or "ggml" in lowered:
        return "text-generation"
    data = Path(train_data_dir) if train_data_dir else None
    if data is not None:
        if data.suffix.lower() in (".jsonl", ".json"):
            return "text-generation"
        if data.is_dir() and (any(data.glob("*.jsonl")) or any(data.glob("*.json"))):
            return "text-generation"
    if lowered.endswith((".safetensors", ".ckpt")) or "stable-diffusion" in lowered:
        return "image-generation"
    return None


def flux_block_count(base_model: str) -> tuple[int, int] | None:
    """(double blocks, single blocks) of a Flux-class base model, from its transformer config or its file's
    header; None when the path is not a readable Flux model."""
    path = Path(base_model).expanduser()
    try:
        if path.is_dir():
            config_path = path / "transformer" / "config.json"
            if not config_path.is_file():
                config_path = path / "config.json"
            config = jsonsafe.loads(config_path.read_text(encoding="utf-8"), "transformer config")
            return int(config["num_layers"]), int(config["num_single_layers"])
        if path.is_file() and path.suffix.lower() == ".safetensors":
            keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
            found = flux_prefix(set(keys))
            if not found:
                return None
            prefix, layout = found
            names = (
                ("double_blocks", "single_blocks")
                if layout == "original"
                else (
                    "transformer_blocks",
                    "single_transformer_blocks",
                )
            )
            counts = []
            for name in names:
                pattern = re.compile(rf"^{re.escape(prefix)}{name}\.(\d+)\.")
                indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
                counts.append(max(indices) + 1 if indices else 0)
            return counts[0], counts[1]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return None
