"""The Flux reference training step, traced with `MemoryMeter` on the meta device or a CPU.

diffusers' own `FluxTransformer2DModel` (or `ChromaTransformer2DModel`) is built from the architecture config
with fewer blocks (`double`, `single`), LoRA is added on the Flux targets, and one micro-batch of the
flow-matching step runs from cached inputs: packed latents (b, image tokens, 64), T5 hidden states
(b, text tokens, 4096), CLIP's pooled vector, timestep and guidance, then an MSE loss in fp32 and backward.
`loratui.memory.flux` extrapolates the traces to the real number of blocks.

Precisions (`Regime.precision`): ``amp16`` (bf16 frozen weights, LoRA in `lora_dtype`, CUDA autocast
emulated), ``qlora16`` (the blocks' Linear weights stored in fp8 or NF4: emulated as a layer that dequantises a
transient bf16 copy for each matmul and does not keep its input, see `probe.Linear4bitStandIn`), ``fp32``
(CPU training without mixed precision).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from loratui.memory.meter import MemoryMeter
from loratui.memory.probe import (
    AMP_DTYPE,
    Linear4bitStandIn,
    Trace,
    _backward,
    _enter,
    _finish,
    _forward_autocast,
    _meter_for,
    _tensor,
    _to_fp32,
    _trace_mode,
    full_precision,
)
from loratui.memory.regime import Point, Regime
from loratui.models.flux.lora import DOUBLE_BLOCK_TARGETS, SINGLE_BLOCK_TARGETS

#: LoRA targets of the Flux trainer (diffusers module names, suffixes inside the blocks)
DOUBLE_TARGETS, SINGLE_TARGETS = DOUBLE_BLOCK_TARGETS, SINGLE_BLOCK_TARGETS
BLOCK_LISTS = {"double": "transformer_blocks", "single": "single_transformer_blocks"}
_BASE_CACHE: dict[tuple, torch.nn.Module] = {}


def transformer_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, name)


def build_transformer(
    arch: dict[str, Any], double: int, single: int, device: str, dtype: torch.dtype
) -> torch.nn.Module:
    """The transformer of `arch` (a bundled Flux config: {"class", "config"}) with `double` + `single` blocks."""
    key = (arch["class"], repr(sorted(arch["config"].items())), double, single, device)
    if key not in _BASE_CACHE:
        values = {**arch["config"], "num_layers": double, "num_single_layers": single}
        with torch.device(device):
            model = transformer_class(arch["class"])(**values)
        model.requires_grad_(False)
        if len(_BASE_CACHE) > 6:
            _BASE_CACHE.clear()
        _BASE_CACHE[key] = model
    model = copy.deepcopy(_BASE_CACHE[key])
    return model.to(dtype)


def target_names(model: torch.nn.Module, targets: tuple[str, ...] | None) -> list[str]:
    """Full names of the Linear layers LoRA adapts: the Flux defaults, or `targets` as suffixes inside blocks."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        kind = next((k for k, attr in BLOCK_LISTS.items() if name.startswith(attr + ".")), None)
        if kind is None:
            continue
        inner = name.split(".", 2)[2]
        wanted = targets or (DOUBLE_TARGETS if kind == "double" else SINGLE_TARGETS)
        if any(inner == t or inner.endswith("." + t) for t in wanted):
            found.append(name)
    return found


class Fp8LinearStandIn(Linear4bitStandIn):
    """A block Linear stored in fp8 e4m3 (accounted analytically) as the Flux trainer runs it: the weight is
    upcast to a transient bf16 copy for each matmul (again in backward), the input is not kept for the frozen
    weight, and the output stays in the compute dtype like an autocast Linear's (bitsandbytes' NF4 layer returns
    the input's dtype instead)."""

    def forward(self, x):
        from loratui.memory.probe import _Matmul4bit

        return _Matmul4bit.apply(x.to(self.compute_dtype), self.weight)


#: `Regime.network` of a Flux step whose blocks are stored in fp8 (NF4 is `Regime.precision` "qlora16/32")
FP8_NETWORK = "fp8-base"


def quantise_blocks(model: torch.nn.Module, fp8: bool, compute: torch.dtype) -> None:
    """The blocks' Linear layers as fp8/NF4 layers run them (see module docstring)."""
    for attr in BLOCK_LISTS.values():
        for module in getattr(model, attr).modules():
            if isinstance(module, torch.nn.Linear):
                module.__class__ = Fp8LinearStandIn if fp8 else Linear4bitStandIn
                module.compute_dtype = compute


def add_flux_lora(model: torch.nn.Module, regime: Regime, rank: int, lora_dtype: torch.dtype) -> None:
    """PEFT LoRA on the Flux targets (weights in `lora_dtype`), checkpointing per block when asked."""
    from peft import LoraConfig, inject_adapter_in_model

    compute = torch.float32 if full_precision(regime.precision) else AMP_DTYPE
    if regime.precision.startswith("qlora") or regime.network == FP8_NETWORK:
        quantise_blocks(model, regime.network == FP8_NETWORK, compute)
    names = target_names(model, regime.targets)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=names, lora_dropout=0.0)
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(lora_dtype)
            param.requires_grad_(True)
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, Linear4bitStandIn) and not isinstance(base, Fp8LinearStandIn):
            base.adapted = True  # PEFT's 4-bit LoRA layer clones the base output
    if regime.checkpointing:
        model.enable_gradient_checkpointing()


def split_tokens(tokens: int) -> tuple[int, int]:
    """(image tokens, text tokens) of a traced packed sequence: a third text, at most 512 tokens."""
    text = max(1, min(512, tokens // 3))
    return tokens - text, text


def flux_loss(model: torch.nn.Module, point: Point, device: str, mode, precision: str) -> torch.Tensor:
    """One micro-batch of the flow-matching step from cached latents and text-encoder outputs."""
    config = model.config
    image, text = split_tokens(point.tokens)
    b = point.batch
    dtype = next(p for p in model.parameters() if not p.requires_grad).dtype
    latents = _tensor((b, image, int(config.in_channels)), device)
    noise = _tensor((b, image, int(config.in_channels)), device)
    t = _tensor((b,), device).sigmoid() if device != "meta" else _tensor((b,), device)
    noisy = (1 - t[:, None, None]) * latents + t[:, None, None] * noise
    kwargs: dict[str, Any] = {
        "encoder_hidden_states": _tensor((b, text, int(config.joint_attention_dim)), device, dtype),
        "timestep": t,
        "img_ids": _tensor((image, 3), device),
        "txt_ids": _tensor((text, 3), device),
    }
    if "pooled_projection_dim" in config:
        kwargs["pooled_projections"] = _tensor((b, int(config.pooled_projection_dim)), device, dtype)
    if config.get("guidance_embeds"):
        kwargs["guidance"] = _tensor((b,), device)
    with _forward_autocast(mode, precision):
        prediction = model(noisy.to(dtype), return_dict=False, **kwargs)[0]
        if not full_precision(precision):
            prediction = _to_fp32(prediction)
    mode.autocast_active = False
    target = noise - latents
    return torch.nn.functional.mse_loss(prediction.float(), target.float(), reduction="mean")


def trace_flux(
    arch: dict[str, Any],
    double: int,
    single: int,
    regime: Regime,
    points: list[Point],
    device: str = "meta",
    lora_dtype: torch.dtype = torch.float32,
) -> list[Trace]:
    """Trace one micro-batch of Flux LoRA training with `double` + `single` blocks at each point."""
    dtype = torch.float32 if full_precision(regime.precision) else AMP_DTYPE
    traces = []
    by_rank: dict[int, list[Point]] = {}
    for point in points:
        by_rank.setdefault(point.rank, []).append(point)
    for rank, group in by_rank.items():
        model = build_transformer(arch, double, single, device, dtype)
        add_flux_lora(model, regime, rank, lora_dtype)
        model.train()
        for point in group:
            meter: MemoryMeter = _meter_for([model])
            static = meter.live_bytes
            mode = _trace_mode(regime.precision, device)
            with _enter(mode, regime.precision, device), meter:
                loss = flux_loss(model, point, device, mode, regime.precision)
                mode.autocast_active = not full_precision(regime.precision)
                _backward(loss)
                mode.autocast_active = False
                del loss
            traces.append(_finish(meter, point, static))
            for param in model.parameters():
                param.grad = None
    return traces


# --- parameter counts ------------------------------------------------------------------------------------------


def _block_counts(block: torch.nn.Module) -> dict[str, Any]:
    linears = {
        name: [int(m.in_features), int(m.out_features)]
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    linear = sum(int(m.weight.numel()) for m in block.modules() if isinstance(m, torch.nn.Linear))
    total = sum(int(p.numel()) for p in block.parameters())
    return {"linear": linear, "rest": total - linear, "linears": linears}


def t5_params(config: dict[str, Any]) -> int:
    """Parameters of transformers' `T5EncoderModel` (gated feed-forward, no biases, RMS norms; relative
    position bias in the first layer) from its config."""
    d, heads, d_kv, d_ff = (int(config[k]) for k in ("d_model", "num_heads", "d_kv", "d_ff"))
    gated = str(config.get("feed_forward_proj", "relu")).startswith("gated")
    layer = 4 * d * heads * d_kv + (3 if gated else 2) * d * d_ff + 2 * d
    bias = int(config.get("relative_attention_num_buckets", 32)) * heads
    return int(config["vocab_size"]) * d + int(config["num_layers"]) * layer + bias + d


def clip_params(config: dict[str, Any]) -> int:
    """Parameters of transformers' `CLIPTextModel` from its config."""
    h, inner = int(config["hidden_size"]), int(config["intermediate_size"])
    layer = 4 * (h * h + h) + 2 * h * inner + inner + h + 4 * h
    embeddings = (int(config["vocab_size"]) + int(config.get("max_position_embeddings", 77))) * h
    return embeddings + int(config["num_hidden_layers"]) * layer + 2 * h


def summarise_flux(configs: dict[str, Any]) -> dict[str, Any]:
    """Parameter counts of a Flux model from its configs (meta device): the transformer per block kind (Linear
    weights, which fp8/NF4 store, and the rest), its parts outside the blocks, the text encoders and the VAE."""
    from diffusers import AutoencoderKL

    arch = configs["transformer"]
    model = build_transformer(arch, 1, 1, "meta", torch.float32)
    double = _block_counts(model.transformer_blocks[0])
    single = _block_counts(model.single_transformer_blocks[0])
    total = sum(int(p.numel()) for p in model.parameters())
    other = total - double["linear"] - double["rest"] - single["linear"] - single["rest"]
    encoders = {}
    for key in ("text_encoder", "text_encoder_2"):
        if key in configs:
            entry = configs[key]
            t5 = entry["class"].startswith("T5")
            count = t5_params(entry["config"]) if t5 else clip_params(entry["config"])
            encoders["t5" if t5 else "clip"] = count
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(configs["vae"])
    return {
        "double": double,
        "single": single,
        "other": other,
        "num_double": int(arch["config"].get("num_layers", 19)),
        "num_single": int(arch["config"].get("num_single_layers", 38)),
        "encoders": encoders,
        "vae": sum(int(p.numel()) for p in vae.parameters()),
        "vae_factor": 2 ** (len(configs["vae"].get("block_out_channels", [0] * 4)) - 1),
        "latent_channels": int(configs["vae"].get("latent_channels", 16)),
    }


def trace_vae_encode(vae_config: dict[str, Any], points: list[Point], device: str = "meta") -> list[Trace]:
    """Peak above the weights of encoding a micro-batch of images with the AE (fp32, no gradients); `tokens`
    is the number of latent pixels."""
    from diffusers import AutoencoderKL

    with torch.device(device):
        vae = AutoencoderKL.from_config(vae_config)
    vae.requires_grad_(False)
    factor = 2 ** (len(vae_config.get("block_out_channels", [0] * 4)) - 1)
    traces = []
    for point in points:
        meter = _meter_for([vae])
        static = meter.live_bytes
        from loratui.memory.tracemode import TraceMode

        with _enter(TraceMode(None), "fp32", device), meter, torch.no_grad():
            side = max(factor, round(point.tokens**0.5) * factor)
            pixels = _tensor((point.batch, 3, side, side), device)
            latents = vae.encode(pixels).latent_dist.mode()
            del pixels, latents
        traces.append(_finish(meter, point, static))
    return traces
