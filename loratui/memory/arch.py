"""Which architecture a config trains, read from the model's own config files (never its weights).

An `ArchSpec` holds the architecture configs (UNet / VAE / text encoders for Stable Diffusion, `config.json`
for a causal LM) plus a fingerprint that identifies the architecture independently of the weights, so a
fine-tuned SD1.5 checkpoint matches the SD1.5 tables shipped with loratui.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

SD_FAMILIES = ("sd15", "sd2", "sdxl")
SD_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
#: the config keys that shape each SD component, with the libraries' defaults for keys a file leaves out
#: (files saved by different diffusers/transformers versions list different optional keys)
_SD_KEYS: dict[str, dict[str, Any]] = {
    "unet": {
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": None,
        "up_block_types": None,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": None,
        "layers_per_block": 2,
        "cross_attention_dim": 1280,
        "attention_head_dim": 8,
        "num_attention_heads": None,
        "transformer_layers_per_block": 1,
        "use_linear_projection": False,
        "only_cross_attention": False,
        "dual_cross_attention": False,
        "addition_embed_type": None,
        "addition_time_embed_dim": None,
        "projection_class_embeddings_input_dim": None,
        "class_embed_type": None,
        "encoder_hid_dim": None,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "conv_in_kernel": 3,
        "conv_out_kernel": 3,
        "time_embedding_type": "positional",
    },
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": None,
        "up_block_types": None,
        "block_out_channels": None,
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "mid_block_add_attention": True,
    },
    "text_encoder": {
        "hidden_size": None,
        "intermediate_size": None,
        "num_hidden_layers": None,
        "num_attention_heads": None,
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "projection_dim": 512,
        "hidden_act": "quick_gelu",
        "_class": "CLIPTextModel",
    },
}
_LLM_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "tie_word_embeddings",
    "hidden_act",
    "attention_bias",
    "mlp_bias",
)
#: what transformers assumes for `_LLM_KEYS` a config.json leaves out, per model type (files saved by older
#: versions omit them: Llama-2's published config has no attention_bias / mlp_bias), so such a file matches the
#: same shipped table as one that spells the defaults out
_LLM_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "tie_word_embeddings": False},
}
DEFAULT_LLM = "llama-2-7b"


@dataclass
class ArchSpec:
    """Architecture configs of the model a config trains."""

    kind: str  # sd | llm
    family: str  # sd15 | sd2 | sdxl | llm
    configs: dict[str, dict[str, Any]]
    source: str  # where the configs came from
    notes: list[str] = field(default_factory=list)

    @cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.kind, self.configs)

    @property
    def sdxl(self) -> bool:
        return "text_encoder_2" in self.configs

    @property
    def num_layers(self) -> int:
        """Decoder layers of a causal LM, under the family's own key (`num_hidden_layers`, `n_layer`, ...); 0 for SD."""
        if self.kind != "llm":
            return 0
        from loratui.config.base_model import llm_dimension

        found = llm_dimension(self.configs["model"], "layers")
        return found[0] if found else 0

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "family": self.family, "configs": self.configs, "source": self.source}


def _normalise(name: str, config: dict[str, Any]) -> dict[str, Any]:
    keys = _SD_KEYS["text_encoder" if name.startswith("text_encoder") else name]
    return {key: config.get(key, default) for key, default in keys.items()}


def fingerprint(kind: str, configs: dict[str, dict[str, Any]]) -> str:
    """A short hash of what determines parameter counts and activation memory."""
    if kind == "llm":
        model = configs["model"]
        text = model.get("text_config", model)
        defaults = _LLM_DEFAULTS.get(str(text.get("model_type")), {})
        payload: Any = {k: text.get(k, defaults.get(k)) for k in _LLM_KEYS}
        if payload["num_key_value_heads"] is None:
            payload["num_key_value_heads"] = text.get("num_attention_heads")
        if payload["head_dim"] is None and text.get("hidden_size") and text.get("num_attention_heads"):
            payload["head_dim"] = int(text["hidden_size"]) // int(text["num_attention_heads"])
    else:
        payload = {
            name: _normalise(name, cfg) for name, cfg in sorted(configs.items()) if name in SD_COMPONENTS
        }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --- reading configs ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _sd_folder_configs(folder: Path) -> dict[str, dict[str, Any]]:
    index = _read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    configs: dict[str, dict[str, Any]] = {}
    for name in SD_COMPONENTS:
        path = folder / name / "config.json"
        if not path.is_file():
            continue
        config = _read_json(path)
        if name.startswith("text_encoder"):
            entry = index.get(name)
            declared = (config.get("architectures") or [None])[0]
            config["_class"] = declared or (entry[1] if isinstance(entry, list) else "CLIPTextModel")
        configs[name] = config
    return configs


def bundled_sd_configs(name: str) -> dict[str, dict[str, Any]]:
    """The real architecture configs loratui ships for sd15, sd2, sd2-v or sdxl (no weights)."""
    root = resources.files("loratui.models.sd_configs").joinpath(name)
    return _sd_folder_configs(Path(str(root)))


def bundled_llm_config(name: str) -> dict[str, Any]:
    """A causal-LM config shipped with the memory planner (`known_llm_names()`: Llama 2/3.x, Qwen2.5/3,
    Gemma 2/3, Mistral, Phi-4, ...): the real config.json of the published model, no weights."""
    text = resources.files("loratui.memory").joinpath("arch_configs", f"{name}.json").read_text("utf-8")
    return json.loads(text)


def known_llm_names() -> list[str]:
    root = resources.files("loratui.memory").joinpath("arch_configs")
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".json"))


def _default_llm_for(name: str) -> str:
    """The shipped config a model name refers to ("Qwen/Qwen2.5-7B-Instruct" -> qwen2.5-7b), else one of its
    size read from the name."""
    lowered = Path(name).name.lower() if name else ""
    for known in sorted(known_llm_names(), key=len, reverse=True):
        found = re.search(rf"(^|[^a-z0-9.]){re.escape(known)}([^a-z0-9.]|$)", lowered)
        if found and not lowered[found.end() :].startswith(("mini", "small", "medium")):
            return known
    return _nearest_in_size(name)


def _nearest_in_size(name: str) -> str:
    """The shipped config nearest in size to the one in a name ("Llama-2-70b-hf" -> llama-3.1-70b); a ~7B name
    or none: `DEFAULT_LLM`."""
    import math

    from loratui.config.base_model import _llm_params, params_from_name

    size = params_from_name(name or "")
    if not size or abs(math.log(size / 7e9)) < 0.1:
        return DEFAULT_LLM
    sizes = {known: _llm_params(bundled_llm_config(known)) or 1 for known in known_llm_names()}
    return min(sizes, key=lambda known: abs(math.log(sizes[known] / size)))


def _hub_config(repo_id: str) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def _llm_spec(base_model: str, info: Any) -> ArchSpec:
    folder = Path(base_model).expanduser()
    config_path = None
    if info is not None and info.kind == "hf-folder":
        config_path = folder / "config.json"
    elif info is not None and info.kind == "hub-id":
        config_path = _hub_config(base_model)
    if config_path is not None and config_path.is_file():
        return ArchSpec("llm", "llm", {"model": _read_json(config_path)}, str(config_path))
    if info is not None and info.kind == "gguf":
        found = _gguf_spec(folder)
        if found is not None:
            return found
    name = _default_llm_for(base_model)
    bundled = ArchSpec("llm", "llm", {"model": bundled_llm_config(name)}, f"bundled:{name}")
    if base_model == name:  # a shipped architecture asked for by name (presets, benchmarks)
        return bundled
    why = "no base_model set" if not base_model else f"the architecture of {base_model} cannot be read here"
    bundled.notes.append(f"{why}; assuming the {name} architecture")
    return bundled


def _gguf_spec(path: Path) -> ArchSpec | None:
    """The architecture stored in a GGUF file's header, at its own size (training dequantises the weights)."""
    from loratui.config.gguf_header import describe_gguf, llm_config_from_gguf, read_gguf_header

    try:
        header = read_gguf_header(path)
    except (OSError, ValueError):
        return None
    config = llm_config_from_gguf(header)
    if not config.get("num_hidden_layers") or not config.get("hidden_size"):
        return None
    note = (
        f"architecture read from the GGUF header ({header.architecture}, {config['num_hidden_layers']} layers, "
        f"hidden {config['hidden_size']}); {describe_gguf(header)}; training loads it dequantised"
    )
    return ArchSpec("llm", "llm", {"model": config}, str(path), [note])


def _sd_bundled_name(family: str, info: Any) -> str:
    if family != "sd2":
        return family
    return "sd2-v" if info is not None and "v-prediction" in getattr(info, "notes", []) else "sd2"


def arch_from_config(cfg: Any, family: str | None = None) -> ArchSpec:
    """The `ArchSpec` for a `TrainConfig` (or `ResolvedConfig`): base_model's own configs, else the family's."""
    from loratui.config.base_model import inspect_base_model

    inner = getattr(cfg, "config", cfg)
    family = family or getattr(cfg, "family", None) or inner.model_family
    base = str(inner.base_model or "")
    info = inspect_base_model(base) if base else None
    if family in (None, "auto"):
        family = (info.family if info and info.family else None) or (
            "llm" if inner.task_type == "text-generation" else "sd15"
        )
    if family == "llm" or inner.task_type == "text-generation":
        return _llm_spec(base, info)
    if family not in SD_FAMILIES:
        family = "sd15"
    if info is not None and info.kind == "diffusers-folder":
        configs = _sd_folder_configs(Path(base).expanduser())
        if "unet" in configs and "text_encoder" in configs:
            return ArchSpec("sd", str(info.family or family), configs, str(Path(base).expanduser()))
    name = _sd_bundled_name(family, info)
    spec = ArchSpec("sd", family, bundled_sd_configs(name), f"bundled:{name}")
    if info is None or info.kind in ("missing", "hub-id", "unknown"):
        what = "no base_model set" if info is None else f"{base} is not readable here"
        spec.notes.append(f"{what}; assuming the {name} architecture")
    return spec
