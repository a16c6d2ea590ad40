"""The Flux training step (FLUX.1-dev/schnell, Chroma): predicted peak device memory from configs only.

peak = transformer weights resident on the device (base_weights_dtype; blocks_to_swap blocks in CPU memory,
       plus the prefetch buffer)
       + LoRA parameters + optimizer state
       + max(micro-batch forward/backward, optimizer step)
       + text encoders (unless their outputs are cached) + the AE (unless latents are cached)
       (+ on CUDA: context, cuBLAS workspace, allocator fragmentation)

Before training, the caching passes run with only the encoder on the device (T5 + CLIP encode every caption
once, the AE every image); when they need more than the step, they are the peak.

Parameter counts come from diffusers' `FluxTransformer2DModel` / `ChromaTransformer2DModel`, transformers' T5
and CLIP and diffusers' `AutoencoderKL`, built on the meta device from the architecture configs
(`loratui/models/flux/configs/`, or a diffusers folder's own). The forward/backward term is fitted from traced
steps of the real transformer at reduced depth (1-2 double and 1-2 single blocks, `flux_probe`) over micro-batch,
packed sequence length and rank (the micro-batch's inputs — latents, noise, T5 states — are in it), and
extrapolated linearly to the real number of blocks. Shipped tables
(`arch_configs/flux_tables/`) hold counts and fits for FLUX.1-dev, schnell and Chroma; other architectures are
traced on first use and cached on disk.

What the trainer is assumed to do (`loratui.train.flux`): weights in bf16 (fp32 without mixed precision);
with `base_weights_dtype` fp8 or nf4 every Linear weight inside the double and single blocks is stored in e4m3
(1 byte) or NF4 (with its block constants), dequantised to a transient bf16 copy per layer, the layer input not
kept for the frozen weight; embedders, norms, biases and the final layer stay bf16. LoRA on the diffusers
targets in fp32 (`lora_dtype: bf16` halves it). `blocks_to_swap: N` means what it means in kohya sd-scripts:
the last N // 2 double and the last 2 x (N - N // 2) single blocks live in CPU memory (one block of each kind
stays on the device: at most 36 for FLUX.1), as `loratui.models.flux.block_swap` does; NF4 weights stay on
the device; at most two swapped blocks are on the device at once (the one computing and the one being
prefetched).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from loratui.config.flux_checks import max_blocks_to_swap, swap_split  # noqa: F401 (re-exported)
from loratui.memory.estimate_types import NF4_BYTES, Estimate, _band, cuda_overheads
from loratui.memory.regime import Point, Regime

FLUX_FAMILIES = ("flux", "chroma")
BUNDLED = ("flux1-dev", "flux1-schnell", "chroma")
FLUX_FIT_VERSION = 1
#: traced shapes (packed tokens: image + text) on the meta device and, for small architectures, this CPU
FLUX_TOKENS = {"meta": (1536, 4608, 9728), "cpu": (48, 96, 192)}
FLUX_RANKS = (8, 64)
DEPTHS = ((1, 1), (2, 1), (1, 2))  # (double, single) blocks traced; the differences are the per-block growth
VAE_TOKENS = {"meta": (4096, 16384), "cpu": (64, 256)}
CPU_TRACE_PARAM_LIMIT = 50_000_000
T5_BYTES_FP8 = 1
#: base_weights_dtype -> bytes per Linear weight element inside the blocks (16-bit storage: the compute width)
QUANT_BYTES = {"fp8": 1.0, "nf4": NF4_BYTES}
_MEMORY: dict[str, Any] = {}


def is_flux_family(family: str | None) -> bool:
    return family in FLUX_FAMILIES


def flux_family(cfg: Any, family: str | None) -> str | None:
    """ "flux" or "chroma" when the config trains a Flux-class model, else None."""
    for value in (family, getattr(cfg, "model_family", None)):
        if value in FLUX_FAMILIES:
            return str(value)
    return None


# --- architecture ---------------------------------------------------------------------------------------------


def bundled_flux_configs(name: str) -> dict[str, Any]:
    """A shipped architecture config (`flux1-dev`, `flux1-schnell`, `chroma`): class names and kwargs."""
    text = resources.files("loratui.models.flux").joinpath("configs", f"{name}.json").read_text("utf-8")
    return json.loads(text)


def _folder_configs(folder: Path, fallback: dict[str, Any]) -> dict[str, Any] | None:
    """A diffusers Flux folder's own configs (transformer, vae, text encoders), or None when it is not one."""
    path = folder / "transformer" / "config.json"
    if not path.is_file():
        return None
    own = json.loads(path.read_text("utf-8"))
    name = own.get("_class_name") or fallback["transformer"]["class"]
    config = {k: v for k, v in own.items() if not k.startswith("_")}
    configs = {**fallback, "transformer": {"class": name, "config": config}}
    if (folder / "vae" / "config.json").is_file():
        vae = json.loads((folder / "vae" / "config.json").read_text("utf-8"))
        configs["vae"] = {k: v for k, v in vae.items() if not k.startswith("_")}
    for key in ("text_encoder", "text_encoder_2"):
        found = folder / key / "config.json"
        if found.is_file() and key in fallback:
            encoder = json.loads(found.read_text("utf-8"))
            keep = {k: v for k, v in encoder.items() if k in fallback[key]["config"]}
            configs[key] = {"class": fallback[key]["class"], "config": {**fallback[key]["config"], **keep}}
    configs["t5_max_length"] = _folder_t5_length(folder, configs)
    return configs


def _single_file_configs(path: Path, fallback: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The transformer config of a single-file checkpoint (original BFL layout `double_blocks.N`, or diffusers'
    `transformer_blocks.N`) read from its safetensors header: block counts, width, guidance embedding; and
    a note with its stored weight dtype. None when the header is not a Flux transformer's."""
    import re

    from loratui.config.base_model import read_safetensors_header

    try:
        header = read_safetensors_header(path)
    except (OSError, ValueError):
        return None
    keys = [k.removeprefix("model.diffusion_model.") for k in header if k != "__metadata__"]
    counts = {}
    for kind, patterns in (
        ("double", (r"^double_blocks\.(\d+)\.", r"^transformer_blocks\.(\d+)\.")),
        ("single", (r"^single_blocks\.(\d+)\.", r"^single_transformer_blocks\.(\d+)\.")),
    ):
        found = [int(m.group(1)) for k in keys for p in patterns if (m := re.match(p, k))]
        counts[kind] = max(found) + 1 if found else 0
    if not counts["double"] or not counts["single"]:
        return None
    config = dict(fallback["transformer"]["config"])
    config["num_layers"], config["num_single_layers"] = counts["double"], counts["single"]
    entry = header.get("img_in.weight") or header.get("model.diffusion_model.img_in.weight")
    entry = entry or header.get("x_embedder.weight")
    if entry and entry.get("shape"):
        config["num_attention_heads"] = int(entry["shape"][0]) // int(config["attention_head_dim"])
    if "guidance_embeds" in config:
        config["guidance_embeds"] = any(
            k.startswith(("guidance_in.", "time_text_embed.guidance")) for k in keys
        )
    dtypes = sorted({str(v.get("dtype")) for k, v in header.items() if k != "__metadata__"})
    note = (
        f"architecture read from {path.name}'s header ({counts['double']} double + {counts['single']} single "
        f"blocks; stored as {', '.join(dtypes)})"
    )
    return {**fallback, "transformer": {**fallback["transformer"], "config": config}}, note


def _folder_t5_length(folder: Path, configs: dict[str, Any]) -> int:
    """T5 tokens per caption as the trainer takes them from a folder (`FluxParts.default_t5_max_length`): 256
    for schnell (no guidance embedding), else 512, capped at the T5 tokenizer's own `model_max_length`."""
    transformer = configs["transformer"]
    schnell = transformer["class"] == "FluxTransformer2DModel" and not transformer["config"].get(
        "guidance_embeds"
    )
    wanted = 256 if schnell else 512
    for name in ("tokenizer_2", "tokenizer"):
        path = folder / name / "tokenizer_config.json"
        if not path.is_file():
            continue
        try:
            found = json.loads(path.read_text("utf-8"))
        except ValueError:
            continue
        limit = found.get("model_max_length")
        if (
            "T5" in str(found.get("tokenizer_class", ""))
            or name == "tokenizer_2"
            or "text_encoder_2" not in configs
        ):
            if isinstance(limit, int) and 0 < limit < wanted:
                return limit
            break
    return wanted


def bundled_name(cfg: Any, family: str) -> str:
    """The shipped architecture a config's base model is taken as when its own configs cannot be read."""
    if family == "chroma":
        return "chroma"
    base = str(getattr(cfg, "base_model", "") or "").lower()
    return "flux1-schnell" if "schnell" in base else "flux1-dev"


@dataclass
class FluxSpec:
    """Architecture configs of the Flux model a config trains (kind "flux")."""

    family: str  # flux | chroma
    name: str  # the bundled architecture it is, or is taken as
    configs: dict[str, Any]
    source: str
    notes: list[str] = field(default_factory=list)
    kind: str = "flux"

    @property
    def fingerprint(self) -> str:
        payload = {k: self.configs.get(k) for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
        blob = json.dumps(payload, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def t5_max_length(self) -> int:
        return int(self.configs.get("t5_max_length") or 512)


def flux_spec(cfg: Any, family: str) -> FluxSpec:
    """The `FluxSpec` of a config: a diffusers folder's own configs, else the bundled one for its variant."""
    name = bundled_name(cfg, family)
    configs = bundled_flux_configs(name)
    base = str(getattr(cfg, "base_model", "") or "")
    folder = Path(base).expanduser() if base else None
    if folder is not None and folder.is_dir():
        own = _folder_configs(folder, configs)
        if own is not None:
            return FluxSpec(family, name, own, str(folder))
    if folder is not None and folder.is_file() and folder.suffix == ".safetensors":
        found = _single_file_configs(folder, configs)
        if found is not None:
            return FluxSpec(family, name, found[0], str(folder), [found[1]])
    spec = FluxSpec(family, name, configs, f"bundled:{name}")
    if not base:
        spec.notes.append(f"no base_model set; assuming the {configs['name']} architecture")
    elif folder is not None and folder.is_file():
        spec.notes.append(
            f"{base} is not a Flux transformer file; assuming the {configs['name']} architecture"
        )
    elif folder is None or not folder.exists():
        spec.notes.append(f"{base} is not readable here; assuming the {configs['name']} architecture")
    return spec


# --- counts, fits and their caches ------------------------------------------------------------------------------


def _shipped() -> dict[str, dict[str, Any]]:
    if "_shipped" not in _MEMORY:
        found: dict[str, dict[str, Any]] = {}
        root = resources.files("loratui.memory").joinpath("arch_configs", "flux_tables")
        if root.is_dir():
            for entry in root.iterdir():
                if entry.name.endswith(".json"):
                    table = json.loads(entry.read_text("utf-8"))
                    found[table["fingerprint"]] = table
        _MEMORY["_shipped"] = found
    return _MEMORY["_shipped"]


def _disk(key: str) -> Path:
    from loratui.memory.tables import _versions, cache_dir

    material = f"flux|{key}|v{FLUX_FIT_VERSION}|{_versions()}|{FLUX_TOKENS}|{FLUX_RANKS}|{DEPTHS}"
    return cache_dir() / f"flux-{hashlib.sha256(material.encode()).hexdigest()[:24]}.json"


def _cached(spec: FluxSpec, key: str, make) -> Any:
    """A value from memory, the shipped table, the disk cache, or `make()` (then stored)."""
    full = f"{spec.fingerprint}|{key}"
    if full in _MEMORY:
        return _MEMORY[full]
    table = _shipped().get(spec.fingerprint)
    if table is not None and key in table["entries"]:
        _MEMORY[full] = table["entries"][key]
        return _MEMORY[full]
    path = _disk(full)
    if path.is_file():
        try:
            _MEMORY[full] = json.loads(path.read_text("utf-8"))
            return _MEMORY[full]
        except ValueError:
            pass
    value = make()
    _MEMORY[full] = value
    if not os.environ.get("LORATUI_MEMORY_NO_DISK_CACHE"):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(value), encoding="utf-8")
            os.replace(tmp, path)
        except OSError:
            pass
    return value


def flux_summary(spec: FluxSpec) -> dict[str, Any]:
    """Parameter counts (`flux_probe.summarise_flux`), cached."""

    return _cached(spec, "summary", lambda: calibrate_summary(spec))


def calibrate_summary(spec: FluxSpec) -> dict[str, Any]:
    from loratui.memory.flux_probe import summarise_flux
    from loratui.models.sd.loading import quiet_libraries

    with quiet_libraries():
        return summarise_flux(spec.configs)


def _params(summary: dict[str, Any]) -> int:
    d, s = summary["double"], summary["single"]
    blocks = summary["num_double"] * (d["linear"] + d["rest"]) + summary["num_single"] * (
        s["linear"] + s["rest"]
    )
    return blocks + summary["other"]


def trace_source(summary: dict[str, Any], spec: FluxSpec) -> str:
    """ "meta" for shipped tables and large architectures, "cpu" (real random weights) for small ones."""
    if spec.fingerprint in _shipped():
        return "meta"
    return "cpu" if _params(summary) <= CPU_TRACE_PARAM_LIMIT else "meta"


def fit_key(regime: Regime, lora_dtype: str, source: str) -> str:
    return f"step|{source}|{regime.key()}|lora={lora_dtype}"


def flux_fit(spec: FluxSpec, regime: Regime, lora_dtype: str, source: str) -> dict[str, Any]:
    """Coefficients of f(b, T, r) for the step's peak and activations at each traced depth, cached."""

    def make() -> dict[str, Any]:
        return calibrate_flux(spec, regime, lora_dtype, source)

    return _cached(spec, fit_key(regime, lora_dtype, source), make)


def calibrate_flux(spec: FluxSpec, regime: Regime, lora_dtype: str, source: str) -> dict[str, Any]:
    """Trace the step at the `DEPTHS` over the fit's design and solve f for each (see `fit.basis`)."""
    import torch

    from loratui.memory.fit import _single_thread, basis, design, solve
    from loratui.memory.flux_probe import trace_flux
    from loratui.models.sd.loading import quiet_libraries

    device = "cpu" if source == "cpu" else "meta"
    points = design(FLUX_RANKS, FLUX_TOKENS[source])
    rows = [basis(p.batch, p.tokens, p.rank) for p in points]
    width = torch.bfloat16 if lora_dtype == "bf16" else torch.float32
    out: dict[str, Any] = {
        "depths": [list(d) for d in DEPTHS],
        "peak": [],
        "activations": [],
        "residual": 0.0,
    }
    with quiet_libraries(), _single_thread():
        for double, single in DEPTHS:
            traces = trace_flux(spec.configs["transformer"], double, single, regime, points, device, width)
            peak, res_p = solve(rows, [t.peak for t in traces])
            acts, res_a = solve(rows, [t.activations for t in traces])
            out["peak"].append(peak)
            out["activations"].append(acts)
            out["residual"] = max(out["residual"], res_p, res_a)
    return out


def evaluate_fit(fit: dict[str, Any], summary: dict[str, Any], point: Point) -> tuple[float, float]:
    """(peak, activations) above the weights for the real number of blocks: the (1, 1) trace plus the growth
    per double block and per single block, each measured by one more block of that kind."""
    from loratui.memory.fit import basis

    phi = basis(point.batch, point.tokens, point.rank)
    extra_double, extra_single = summary["num_double"] - 1, summary["num_single"] - 1
    values = []
    for name in ("peak", "activations"):
        base, more_double, more_single = (
            sum(p * c for p, c in zip(phi, co, strict=True)) for co in fit[name]
        )
        values.append(base + extra_double * (more_double - base) + extra_single * (more_single - base))
    return max(values[0], 0.0), max(values[1], 0.0)


def vae_fit(spec: FluxSpec, source: str) -> list[float]:
    """[c0, c_batch, c_batch·tokens] of the AE encoding peak above its weights (fp32, no gradients)."""

    return _cached(spec, f"vae|{source}", lambda: calibrate_vae(spec, source))


def calibrate_vae(spec: FluxSpec, source: str) -> list[float]:
    from loratui.memory.fit import _single_thread, solve
    from loratui.memory.flux_probe import trace_vae_encode
    from loratui.models.sd.loading import quiet_libraries

    t1, t2 = VAE_TOKENS[source]
    points = [Point(1, t1, 0), Point(2, t1, 0), Point(1, t2, 0), Point(2, t2, 0)]
    with quiet_libraries(), _single_thread():
        traces = trace_vae_encode(spec.configs["vae"], points, "cpu" if source == "cpu" else "meta")
    rows = [[1.0, p.batch, p.batch * p.tokens] for p in points]
    return solve(rows, [t.peak for t in traces])[0]


# --- the parts of the step -----------------------------------------------------------------------------------


def block_bytes(summary: dict[str, Any], kind: str, dtype: str, width: int) -> int:
    """Bytes of one block on the device: its Linear weights as stored, everything else at `width`."""
    counts = summary[kind]
    linear = QUANT_BYTES.get(dtype, width)
    return int(counts["linear"] * linear + counts["rest"] * width)


def movable_bytes(summary: dict[str, Any], kind: str, dtype: str, width: int) -> int:
    """Bytes of one block that a swap moves: all of it, except NF4 weights (bitsandbytes' 4-bit weights stay
    on the device; the block's other tensors move)."""
    if dtype == "nf4":
        return int(summary[kind]["rest"] * width)
    return block_bytes(summary, kind, dtype, width)


def transformer_bytes(summary: dict[str, Any], cfg: Any, width: int) -> tuple[int, int, dict[str, int]]:
    """(resident weights, prefetch buffer, details) of the transformer with the config's storage and swap."""
    dtype = str(getattr(cfg, "base_weights_dtype", "bf16") or "bf16")
    double_bytes = block_bytes(summary, "double", dtype, width)
    single_bytes = block_bytes(summary, "single", dtype, width)
    double_moved = movable_bytes(summary, "double", dtype, width)
    single_moved = movable_bytes(summary, "single", dtype, width)
    nd, ns = summary["num_double"], summary["num_single"]
    swap_double, swap_single = swap_split(int(getattr(cfg, "blocks_to_swap", 0) or 0), nd, ns)
    resident = (
        summary["other"] * width
        + nd * double_bytes
        + ns * single_bytes
        - swap_double * double_moved
        - swap_single * single_moved
    )
    largest = max(double_moved if swap_double else 0, single_moved if swap_single else 0)
    details = {
        "swapped_double": swap_double,
        "swapped_single": swap_single,
        "swapped_bytes": swap_double * double_moved + swap_single * single_moved,
        "double_block_bytes": double_bytes,
        "single_block_bytes": single_bytes,
    }
    return int(resident), 2 * largest, details


def lora_layers(summary: dict[str, Any], targets: list[str] | None) -> list[tuple[int, int, int]]:
    """[(d_in, d_out, count)] of the adapted Linear layers (the trainer's targets, or `targets` as suffixes)."""
    from loratui.memory.flux_probe import DOUBLE_TARGETS, SINGLE_TARGETS

    out = []
    for kind, count_key, default in (
        ("double", "num_double", DOUBLE_TARGETS),
        ("single", "num_single", SINGLE_TARGETS),
    ):
        wanted = tuple(targets) if targets else default
        for name, (d_in, d_out) in summary[kind]["linears"].items():
            if any(name == t or name.endswith("." + t) for t in wanted):
                out.append((int(d_in), int(d_out), int(summary[count_key])))
    return out


def encoder_bytes(summary: dict[str, Any], cfg: Any, width: int) -> int:
    """CLIP-L and T5-XXL weights (T5 at 1 byte when its file is an fp8 variant)."""
    encoders = summary["encoders"]
    t5_file = str(getattr(cfg, "t5xxl", "") or "").lower()
    t5_width = T5_BYTES_FP8 if "fp8" in t5_file else width
    return int(encoders.get("clip", 0) * width + encoders.get("t5", 0) * t5_width)


def image_tokens(cfg: Any, vae_factor: int = 8) -> int:
    """Image tokens of the largest bucket: 2x2 latent patches, (resolution / 16)^2 (buckets never exceed the
    area resolution^2)."""
    side = int(cfg.resolution) // (vae_factor * 2)
    return side * side


def text_tokens(cfg: Any, spec: FluxSpec) -> int:
    return int(getattr(cfg, "t5_max_length", None) or spec.t5_max_length)


def t5_encode_bytes(spec: FluxSpec, tokens: int, width: int) -> int:
    """Peak above the weights of T5 encoding `TEXT_BATCH` captions without gradients: one layer's hidden
    states and gated feed-forward, and the relative position bias turned into SDPA's float mask (one per layer,
    shared by the batch: transformers' T5 runs SDPA, which never materialises the batch's attention scores)."""
    from loratui.models.flux.conditioning import TEXT_BATCH  # captions the caching pass encodes at once

    entry = spec.configs.get("text_encoder_2") or spec.configs["text_encoder"]
    config = entry["config"]
    d_model, d_ff, heads = int(config["d_model"]), int(config["d_ff"]), int(config["num_heads"])
    hidden = TEXT_BATCH * tokens * (4 * d_model + 3 * d_ff) * width
    scores = heads * tokens * tokens * (width + 4)  # the bias, and the mask made from it
    return int(hidden + scores)


# --- the estimate ------------------------------------------------------------------------------------------------


@dataclass
class FluxPlanner:
    """The planner of one Flux architecture (same interface as `estimate.Planner`). `steps` is the module of
    shared step pieces (`loratui.memory.estimate`: precision regime, optimizer state, EMA), handed in by
    `estimate.planner_for` so that this module does not import the one that dispatches to it."""

    spec: FluxSpec
    summary: dict[str, Any]
    steps: Any
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return _params(self.summary)

    def estimate(self, cfg: Any, device: str = "cuda") -> Estimate:
        return estimate_flux(self, cfg, device)


_PLANNERS: dict[str, FluxPlanner] = {}


def flux_planner(cfg: Any, family: str, steps: Any) -> FluxPlanner:
    spec = flux_spec(cfg, family)
    key = spec.fingerprint + spec.source
    if key not in _PLANNERS:
        _PLANNERS[key] = FluxPlanner(spec, flux_summary(spec), steps, list(spec.notes))
    return _PLANNERS[key]


def flux_regime(cfg: Any, device: str, steps: Any) -> tuple[Regime, list[str]]:
    """The traced regime: 16-bit compute (or fp32), quantised blocks for fp8/nf4, checkpointing, targets."""
    regime, notes = steps.regime_for(cfg, device, "flux")
    dtype = str(getattr(cfg, "base_weights_dtype", "bf16"))
    precision, network = regime.precision, "lora"
    if dtype == "nf4":
        precision = "qlora16" if precision == "amp16" else "qlora32"
    elif dtype == "fp8":
        network = "fp8-base"  # `flux_probe.FP8_NETWORK`
    targets = tuple(cfg.target_modules) if cfg.target_modules else None
    return Regime(precision, bool(cfg.gradient_checkpointing), False, targets, network), notes


def estimate_flux(planner: FluxPlanner, cfg: Any, device: str) -> Estimate:
    steps = planner.steps  # `loratui.memory.estimate`: the step pieces every family shares
    spec, summary = planner.spec, planner.summary
    regime, notes = flux_regime(cfg, device, steps)
    notes = [*planner.notes, *notes]
    width = 4 if regime.precision in ("fp32", "qlora32") else 2
    source = trace_source(summary, spec)
    lora_dtype = "bf16" if steps.lora_width(cfg) == 2 else "fp32"
    b, r = int(cfg.batch_size), int(cfg.lora_rank)
    image = image_tokens(cfg, int(summary.get("vae_factor", 8)))
    tokens = image + text_tokens(cfg, spec)
    on_gpu = device == "cuda"
    cache_latents = bool(cfg.cache_latents or cfg.cache_latents_to_disk) and not cfg.random_crop
    captions_fixed = cfg.caption_dropout == 0 and not cfg.shuffle_tags
    cache_text = bool(cfg.cache_text_encoder_outputs) and not cfg.train_text_encoder and captions_fixed
    if cfg.train_text_encoder:
        notes.append(
            "the CLIP-L LoRA (train_text_encoder) is not included: small beside the transformer's step"
        )
    if cfg.cache_text_encoder_outputs and not cache_text:
        notes.append(
            "text-encoder outputs cannot be cached with caption dropout / shuffled tags / a trained CLIP"
        )

    resident, buffer, swap = transformer_bytes(summary, cfg, width)
    encoders = encoder_bytes(summary, cfg, width)
    vae = int(summary["vae"] * 4)  # the AE encodes in fp32 (force_upcast)
    layers = lora_layers(summary, cfg.target_modules)
    if not layers:
        notes.append(f"no Linear layer in the blocks matches target_modules {cfg.target_modules}")
    lw = steps.lora_width(cfg)
    tensors = [(d_in, c) for d_in, _, c in layers] + [(d_out, c) for _, d_out, c in layers]
    lora = lw * r * sum((d_in + d_out) * c for d_in, d_out, c in layers)
    shapes = [((r, d_in), c, False) for d_in, _, c in layers] + [
        ((d_out, r), c, True) for _, d_out, c in layers
    ]
    state, temporaries = steps.optimizer_bytes(
        cfg.optimizer, tensors, r, device, shapes, cfg.optimizer_args, width=lw
    )

    fit = flux_fit(spec, regime, lora_dtype, source)
    peak, acts = evaluate_fit(fit, summary, Point(b, tokens, r))
    accumulating = cfg.gradient_accumulation_steps > 1
    step, activations, grads_at_peak = steps.step_parts(peak, acts, lora, accumulating)

    text_on_device = not (on_gpu and cache_text)
    vae_on_device = not (on_gpu and cache_latents)
    weights = resident + buffer + (encoders if text_on_device else 0) + (vae if vae_on_device else 0)
    ema = steps._sd_ema_bytes(cfg, lora, device, notes)
    static = weights + lora + state + ema
    phases: dict[str, float] = {"micro-batch forward/backward": step, "optimizer step": lora + temporaries}
    vae_peak = 0.0
    if not cache_latents or on_gpu:  # the AE encodes during training, or in the caching pass on a GPU
        vae_coef = vae_fit(spec, "cpu" if source == "cpu" else "meta")
        vae_peak = vae_coef[0] + vae_coef[1] * b + vae_coef[2] * b * image * 4  # 4 latent pixels a token
    if not cache_latents:
        phases["AE encoding"] = vae_peak + (lora if accumulating else 0)
    common = {"transformer_weights": resident, "lora_params": lora, "optimizer_state": state}
    if buffer:
        common["block_swap_buffer"] = buffer
    if ema:
        common["ema_weights"] = ema
    if text_on_device:
        common["text_encoders"] = encoders
    if vae_on_device:
        common["vae"] = vae
    phase = max(phases, key=lambda k: phases[k])
    if phase == "optimizer step":
        parts = {**common, "gradients": lora, "optimizer_temporaries": temporaries}
    elif phase == "micro-batch forward/backward":
        parts = {**common, "gradients": grads_at_peak, "activations": activations}
    else:
        parts = {**common, "gradients": lora if accumulating else 0, "encoding": phases[phase]}
    # caching passes: before the transformer is on the device (GPU); on the CPU everything is in memory
    before: dict[str, tuple[dict[str, int], int, float]] = {}
    if on_gpu and cache_latents:
        before["latent caching (before training)"] = ({"vae": vae}, vae, vae_peak)
    if on_gpu and cache_text:
        encode = t5_encode_bytes(spec, text_tokens(cfg, spec), width)
        before["text-encoder caching (before training)"] = ({"text_encoders": encoders}, encoders, encode)
    training = static + phases[phase]
    for name, (weights_part, held, encoding) in before.items():
        if held + encoding > static + phases[phase]:
            if phase not in before:
                shown = ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in parts.items() if v)
                notes.append(
                    f"{name} is the peak; training itself holds {training / 2**30:.2f} GiB of tensors ({shown})"
                )
            phases, static = {name: encoding}, int(held)
            parts = {**weights_part, "encoding": int(encoding)}
            phase = name
    if on_gpu:
        parts.update(cuda_overheads("llm", int(phases[phase]), static))
    parts = {k: int(v) for k, v in parts.items()}
    notes += _notes(cfg, spec, summary, swap, image, tokens, cache_latents, cache_text, on_gpu)
    method = (
        f"{spec.configs['transformer']['class']} traced at reduced depth on "
        + ("this CPU (random weights)" if source == "cpu" else "the meta device (CUDA autocast emulated)")
        + f", extrapolated to {summary['num_double']} double + {summary['num_single']} single blocks"
    )
    return Estimate(
        sum(parts.values()),
        parts,
        method,
        _band(source, float(fit["residual"]), device),
        notes,
        phase,
        device,
    )


def _notes(
    cfg: Any,
    spec: FluxSpec,
    summary: dict[str, Any],
    swap: dict[str, int],
    image: int,
    tokens: int,
    cache_latents: bool,
    cache_text: bool,
    on_gpu: bool,
) -> list[str]:
    notes = [
        f"packed sequence {tokens} tokens: {image} image tokens ((resolution/16)^2, the largest bucket) + "
        f"{tokens - image} T5 tokens"
    ]
    dtype = str(getattr(cfg, "base_weights_dtype", "bf16"))
    if dtype in QUANT_BYTES:
        notes.append(
            f"{dtype} base: the blocks' Linear weights at {QUANT_BYTES[dtype]:.2f} bytes each, the rest bf16"
        )
    requested = int(getattr(cfg, "blocks_to_swap", 0) or 0)
    if requested:
        limit = max_blocks_to_swap(summary["num_double"], summary["num_single"])
        notes.append(
            f"blocks_to_swap {requested}: {swap['swapped_double']} double + {swap['swapped_single']} single "
            f"blocks ({swap['swapped_bytes'] / 2**30:.2f} GiB) in CPU memory, two in flight on the device"
            + (f"; at most {limit} can be swapped" if requested > limit else "")
        )
    if on_gpu and (cache_latents or cache_text):
        moved = [n for n, on in (("the AE", cache_latents), ("T5 and CLIP", cache_text)) if on]
        notes.append(f"with cached outputs, {' and '.join(moved)} encode before training, then leave the GPU")
    return notes
