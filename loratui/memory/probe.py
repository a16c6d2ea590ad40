"""A reference training step of an architecture, traced with `MemoryMeter` on the meta device or a CPU.

The step reproduces what the trainers do for one micro-batch (their LoRA placement, loss and precision
handling are called, not rewritten, wherever they work on the meta device): build the model from its configs
with random (CPU) or no (meta) weights, add LoRA, run forward + loss + backward, and measure how far live memory
rises above the weights. On the meta device nothing is computed, so a 7B model or SDXL at 1024² is traced on a
laptop; GPU behaviour that the meta device lacks (CUDA autocast, fused attention) comes from `TraceMode`.

Precisions: ``fp32`` (CPU training, or `mixed_precision: no`), ``amp16`` (16-bit weights, fp32 LoRA, CUDA
autocast, outputs converted to fp32 as accelerate does), ``qlora16`` / ``qlora32`` (4-bit NF4 base layers
emulated as bitsandbytes runs them: compute in the compute dtype, the layer input not saved; every other weight
kept in that dtype, 16-bit with autocast or fp32 without mixed precision; the LoRA fp32). LLM steps take the
LoRA weights in the regime's `lora_dtype`, cast as the LLM trainer casts them (`apply_lora_dtype`), and the
regime's autocast rules (`Regime.autocast`: CUDA's, or the CPU's for a step planned on the CPU).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from loratui.memory.meter import MemoryMeter
from loratui.memory.regime import Point, Regime
from loratui.memory.tracemode import TraceMode
from loratui.models.checkpointing import enable_activation_checkpointing

AMP_DTYPE = torch.bfloat16
TEXT_TOKENS = 77


@dataclass
class Trace:
    """What one traced micro-batch did, in bytes above the weights (frozen + LoRA) that were live before it."""

    point: Point
    peak: int  # highest (live - weights) during forward + backward, gradients included
    activations: int  # highest activations/temporaries alone
    gradients: int  # LoRA gradients at the end of backward
    ops: int
    timeline: list[tuple[int, int, str]] | None = None  # (activations, gradients, operator) per allocation
    backward_start: int | None = None  # index in `timeline` where backward began


def full_precision(precision: str) -> bool:
    """True for the precisions that compute in fp32 without autocast (`fp32`, `qlora32`)."""
    return precision in ("fp32", "qlora32")


def _trace_mode(precision: str, device: str, rules: str = "cuda") -> TraceMode:
    """The `TraceMode` for a trace; entered only where it changes something (autocast or meta attention)."""
    mode = TraceMode(AMP_DTYPE if not full_precision(precision) else None, rules=rules)
    mode.autocast_active = False
    return mode


def _enter(mode: TraceMode, precision: str, device: str):
    return mode if not full_precision(precision) or device == "meta" else contextlib.nullcontext()


def _meter_for(models: list[torch.nn.Module]) -> MemoryMeter:
    meter = MemoryMeter(record=True)
    for model in models:
        meter.register_model(model)
    meter.reset_peak()
    return meter


def _finish(meter: MemoryMeter, point: Point, static: int, backward_start: int | None = None) -> Trace:
    peaks = meter.category_peaks()
    grads = meter.breakdown("live")["gradients"]
    meter.close()
    return Trace(
        point,
        meter.peak_bytes - static,
        peaks["activations"],
        grads,
        meter.ops,
        meter.timeline,
        backward_start,
    )


@contextlib.contextmanager
def _forward_autocast(mode: TraceMode, precision: str) -> Iterator[None]:
    """Autocast emulation around a model's forward pass (as accelerate wraps `forward`)."""
    if full_precision(precision):
        yield
        return
    mode.autocast_active = True
    try:
        yield
    finally:
        mode.clear_cache()


def _backward(loss: torch.Tensor) -> None:
    """`loss.backward()` without passing through torch-function modes, so that `TraceMode` stays active for
    gradient-checkpoint recomputation (a mode is suspended while it handles a call, and `backward` is one)."""
    from torch.autograd.graph import _engine_run_backward

    _engine_run_backward(
        (loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True
    )


def _to_fp32(value: Any) -> Any:
    from accelerate.utils.operations import convert_to_fp32

    return convert_to_fp32(value)


# --- causal LMs -----------------------------------------------------------------------------------------------


def build_llm(config: dict[str, Any], layers: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A causal LM with `layers` decoder layers from a config.json dict (random or meta weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    values = dict(config)
    model_type = values.pop("model_type")
    values.pop("architectures", None)
    values.pop("torch_dtype", None)
    values.pop("dtype", None)
    hf_config = AutoConfig.for_model(model_type, **values)
    hf_config.num_hidden_layers = layers
    hf_config.use_cache = False
    hf_config._attn_implementation = "sdpa"
    with torch.device(device):
        try:
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        except ValueError as exc:  # no SDPA for this architecture (Gemma 2): eager, as the trainer gets it
            if "scaled_dot_product_attention" not in str(exc):
                raise
            hf_config._attn_implementation = "eager"
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.config.use_cache = False
    return model


class _Matmul4bit(torch.autograd.Function):
    """bitsandbytes' 4-bit matmul as seen by memory: the input is not saved, and the weight is dequantised to a
    fresh compute-dtype copy for the forward and again for the backward matmul (freed right after each)."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        dequantised = weight.to(x.dtype, copy=True)
        return torch.nn.functional.linear(x, dequantised)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad @ weight.to(grad.dtype, copy=True), None


class Linear4bitStandIn(torch.nn.Linear):
    """A base Linear as bitsandbytes' `Linear4bit` runs it (weights kept in the compute dtype here, the 4-bit
    storage is accounted analytically). Casts the input to the compute dtype and the output back to the input
    dtype."""

    compute_dtype = AMP_DTYPE
    adapted = False  # PEFT's 4-bit LoRA layer copies the base layer's output ("defensive clone")

    def forward(self, x):
        in_dtype = x.dtype
        out = _Matmul4bit.apply(x.to(self.compute_dtype), self.weight).to(in_dtype)
        return out.clone() if self.adapted else out


def _emulate_kbit(model: torch.nn.Module, compute_dtype: torch.dtype) -> None:
    """Swap the decoder's Linears (not `lm_head`, which bitsandbytes leaves unquantised) for 4-bit stand-ins that
    compute in `compute_dtype`; every other weight stays in the dtype the model was built in (the trainer loads
    them in the compute dtype, with no fp32 upcast)."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                child.__class__ = Linear4bitStandIn
                child.compute_dtype = compute_dtype


def _llm_train_config(regime: Regime, rank: int) -> Any:
    from loratui.config import TrainConfig

    return TrainConfig(
        task_type="text-generation",
        lora_rank=rank,
        lora_dropout=0.05 if regime.dropout else 0.0,
        gradient_checkpointing=regime.checkpointing,
        target_modules=list(regime.targets) if regime.targets else None,
        lora_dtype=regime.lora_dtype,
    )


def add_llm_lora(model: torch.nn.Module, regime: Regime, rank: int) -> torch.nn.Module:
    """LoRA as the LLM trainer adds it (`loratui.models.llm.lora`: placed, then cast to `lora_dtype`)."""
    from loratui.models.llm.lora import apply_lora_dtype, setup_lora

    cfg = _llm_train_config(regime, rank)
    if not regime.precision.startswith("qlora"):
        return apply_lora_dtype(cfg, setup_lora(cfg, model))
    _emulate_kbit(model, torch.float32 if full_precision(regime.precision) else AMP_DTYPE)
    model = setup_lora(cfg, model)
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if isinstance(base, Linear4bitStandIn):
            base.adapted = True
    return apply_lora_dtype(cfg, model)


@contextlib.contextmanager
def _meta_masks() -> Iterator[None]:
    """transformers inspects position ids for packed rows (a data-dependent check the meta device cannot
    answer); traced rows are never packed."""
    from transformers import masking_utils

    original = masking_utils.find_packed_sequence_indices
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextlib.contextmanager
def _meta_autocast() -> Iterator[None]:
    """`torch.autocast(device_type="meta", enabled=False)` (PEFT's fold of LoRA into fused MoE expert weights)
    does not exist; on the meta device it means the CPU's (the emulated autocast is `TraceMode`'s)."""
    real = torch.autocast

    class _Autocast(real):  # type: ignore[misc,valid-type]
        def __init__(self, device_type: str, *args: Any, **kwargs: Any) -> None:
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = _Autocast  # type: ignore[misc]
    try:
        yield
    finally:
        torch.autocast = real  # type: ignore[misc]


def _meta_batch(batch: int, seq: int) -> Any:
    from loratui.models.llm.batches import Batch

    ids = torch.empty((batch, seq), dtype=torch.long, device="meta")
    labels = torch.empty((batch, seq), dtype=torch.long, device="meta")
    return Batch(ids, labels, None, None, batch * (seq - 1), batch * seq)


def _cpu_batch(batch: int, seq: int, vocab: int) -> Any:
    from loratui.models.llm.batches import Unit, collate

    ids = torch.randint(3, vocab, (batch, seq)).tolist()
    return collate([Unit(row, [-100] + row[1:], seq - 1) for row in ids], 0)


@contextlib.contextmanager
def _emulated_offload(enabled: bool) -> Iterator[None]:
    """Activation offload as device memory sees it (`loratui.models.checkpointing.offloaded_activations`): a
    saved tensor worth offloading leaves the device until backward asks for it, then comes back as a new
    tensor. The trace keeps only its shape; the re-created tensor is zeros (memory, not values, is measured)."""
    from loratui.models.checkpointing import worth_offloading

    if not enabled:
        yield
        return

    def pack(tensor: torch.Tensor) -> Any:
        if not worth_offloading(tensor):
            return tensor
        return (tuple(tensor.shape), tensor.dtype, tensor.device)  # the host copy is contiguous too

    def unpack(packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        shape, dtype, device = packed
        return torch.zeros(shape, dtype=dtype, device=device)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _llm_loss(
    model: torch.nn.Module, batch: int, seq: int, vocab: int, device: str, mode, regime
) -> torch.Tensor:
    """The LLM trainer's token loss for full rows whose every token after the first is a target."""
    from loratui.models.llm.loss import causal_loss_sum, supports_chunked_loss, token_loss_sum

    # the trainer's own selection: models whose forward changes the logits (soft-capping) take the full path below
    if regime.chunked_loss and supports_chunked_loss(model):
        data = _meta_batch(batch, seq) if device == "meta" else _cpu_batch(batch, seq, vocab)
        return causal_loss_sum(
            model, data, chunked=True, autocast=lambda: _forward_autocast(mode, regime.precision)
        )
    if device != "meta":
        from loratui.models.llm.batches import Unit, collate

        ids = torch.randint(3, vocab, (batch, seq)).tolist()
        units = [Unit(row, [-100] + row[1:], seq - 1) for row in ids]
        data = collate(units, 0)
        with _forward_autocast(mode, regime.precision):
            if full_precision(regime.precision):
                return token_loss_sum(model, data)
            out = _to_fp32(
                model(input_ids=data.input_ids, attention_mask=data.attention_mask, use_cache=False)
            )
        return _masked_loss(out.logits, data.labels)
    ids = torch.empty((batch, seq), dtype=torch.long, device="meta")
    with _forward_autocast(mode, regime.precision):
        out = model(input_ids=ids, use_cache=False)
        if not full_precision(regime.precision):
            out = _to_fp32(out)
    rows = torch.empty(batch * (seq - 1), dtype=torch.long, device="meta")
    cols = torch.empty(batch * (seq - 1), dtype=torch.long, device="meta")
    logits = out.logits[:, :-1][rows, cols]  # what boolean masking allocates: (targets, vocab)
    labels = torch.empty(batch * (seq - 1), dtype=torch.long, device="meta")
    return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")


def _masked_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted = labels[:, 1:]
    keep = shifted != -100
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), shifted[keep], reduction="sum")


def _by_rank(points: list[Point]) -> dict[int, list[Point]]:
    groups: dict[int, list[Point]] = {}
    for point in points:
        groups.setdefault(point.rank, []).append(point)
    return groups


def _clear_grads(model: torch.nn.Module) -> None:
    for param in model.parameters():
        param.grad = None


def trace_llm(
    config: dict[str, Any], layers: int, regime: Regime, points: list[Point], device: str = "meta"
) -> list[Trace]:
    """Trace one micro-batch of LLM LoRA training, with `layers` decoder layers, at each point."""
    dtype = torch.float32 if full_precision(regime.precision) else AMP_DTYPE
    traces = []
    for rank, group in _by_rank(points).items():
        model = add_llm_lora(build_llm(config, layers, device, dtype), regime, rank)
        model.train()
        vocab = int(model.config.vocab_size)
        for point in group:
            meter = _meter_for([model])
            static = meter.live_bytes
            mode = _trace_mode(regime.precision, device, regime.autocast)
            masks = _meta_masks() if device == "meta" else contextlib.nullcontext()
            autocast = _meta_autocast() if device == "meta" else contextlib.nullcontext()
            with masks, autocast, _enter(mode, regime.precision, device), meter:
                with _emulated_offload(regime.offload):
                    loss = _llm_loss(model, point.batch, point.tokens, vocab, device, mode, regime)
                # checkpoint recomputation runs under autocast
                mode.autocast_active = not full_precision(regime.precision)
                backward_start = len(meter.timeline or [])
                _backward(loss)
                mode.autocast_active = False
                del loss
            traces.append(_finish(meter, point, static, backward_start))
            _clear_grads(model)
    return traces


# --- Stable Diffusion ------------------------------------------------------------------------------------------


@dataclass
class SDModels:
    """Components built from an `ArchSpec`'s configs."""

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    sdxl: bool

    def components(self) -> dict[str, torch.nn.Module]:
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {"unet": self.unet, **dict(zip(names, self.text_encoders, strict=True))}


def _text_encoder(config: dict[str, Any]) -> torch.nn.Module:
    import transformers

    values = {k: v for k, v in config.items() if not k.startswith("_") and k != "architectures"}
    cls_name = config.get("_class") or "CLIPTextModel"
    cls = getattr(transformers, cls_name, transformers.CLIPTextModel)
    te_config = transformers.CLIPTextConfig(**values)
    te_config._attn_implementation = "sdpa"
    return cls(te_config)


_SD_BASE_CACHE: dict[tuple[str, str], SDModels] = {}


def build_sd(configs: dict[str, dict[str, Any]], device: str, precision: str) -> SDModels:
    """UNet, VAE and text encoders from configs, in the dtypes the SD trainer uses (random or meta weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from loratui.memory.arch import fingerprint

    key = (fingerprint("sd", configs), device)
    if key not in _SD_BASE_CACHE:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(configs["unet"])
            vae = AutoencoderKL.from_config(configs["vae"])
            encoders = [_text_encoder(configs[n]) for n in ("text_encoder", "text_encoder_2") if n in configs]
        base = SDModels(unet, vae, encoders, "text_encoder_2" in configs)
        for module in [base.unet, base.vae, *base.text_encoders]:
            module.requires_grad_(False)
        if len(_SD_BASE_CACHE) > 4:
            _SD_BASE_CACHE.clear()
        _SD_BASE_CACHE[key] = base
    models = copy.deepcopy(_SD_BASE_CACHE[key])
    dtype = torch.float32 if precision == "fp32" else AMP_DTYPE
    vae_dtype = torch.float32 if models.sdxl or precision == "fp32" else dtype
    models.unet.to(dtype)
    models.vae.to(vae_dtype)
    for encoder in models.text_encoders:
        encoder.to(dtype)
    return models


def add_sd_lora(
    models: SDModels, regime: Regime, rank: int, *, train_text_encoder: bool
) -> list[torch.nn.Parameter]:
    """The adapter as the SD trainer adds it (`plan_targets` + `inject_lora`, the regime's network type)."""
    from loratui.models.sd.adapters import spec_from_key
    from loratui.models.sd.lora import LoraPlan, inject_lora, plan_targets

    network = spec_from_key(regime.network)
    components = models.components()
    if regime.checkpointing:
        models.unet.enable_gradient_checkpointing()
        if train_text_encoder:
            for encoder in models.text_encoders:
                enable_activation_checkpointing(encoder)
    targets = plan_targets(
        list(regime.targets) if regime.targets else None,
        components,
        train_text_encoder=train_text_encoder,
        convs=network.adapts_convs,
    )
    plan = LoraPlan(targets, rank, float(rank), 0.05 if regime.dropout else 0.0, network=network)
    return inject_lora(components, plan)


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )


def _tensor(shape: tuple[int, ...], device: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (
        torch.empty(shape, device=device, dtype=dtype)
        if device == "meta"
        else torch.randn(shape, dtype=dtype)
    )


def _text_inputs(models: SDModels, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    width = sum(int(e.config.hidden_size) for e in models.text_encoders)
    dtype = _frozen_dtype(models.unet)
    embeds = _tensor((batch, TEXT_TOKENS, width), device, dtype)
    pooled = None
    if models.sdxl:
        pooled = _tensor((batch, int(models.text_encoders[-1].config.projection_dim)), device, dtype)
    return embeds, pooled


def _frozen_dtype(module: torch.nn.Module) -> torch.dtype:
    return next(p for p in module.parameters() if not p.requires_grad).dtype


def _encode_text(models: SDModels, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The SD trainer's text conditioning (`TextConditioner._run`) on token ids."""
    ids = (
        torch.zeros((batch, TEXT_TOKENS), dtype=torch.long, device=device)
        if device == "meta"
        else torch.randint(0, int(models.text_encoders[0].config.vocab_size), (batch, TEXT_TOKENS))
    )
    if not models.sdxl:
        return models.text_encoders[0](ids)[0], None
    hidden, pooled = [], None
    for encoder in models.text_encoders:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(hidden, dim=-1), pooled


def _unet_loss(models: SDModels, point: Point, device: str, mode: TraceMode, precision: str, embeds, pooled):
    """One micro-batch of the SD trainer's `_group_loss` from cached latents."""
    from loratui.models.sd.conditioning import sdxl_added_conditions
    from loratui.models.sd.loss import per_sample_loss, training_target

    side = max(1, round(point.tokens**0.5))
    channels = int(models.unet.config.in_channels)
    dtype = _frozen_dtype(models.unet)
    scheduler = _scheduler()
    latents = _tensor((point.batch, channels, side, side), device)
    noise = _tensor(tuple(latents.shape), device)
    if device == "meta":
        timesteps = torch.zeros(point.batch, dtype=torch.long, device=device)
    else:
        timesteps = torch.randint(0, 1000, (point.batch,))
    noisy = scheduler.add_noise(latents, noise, timesteps)
    kwargs = {}
    if models.sdxl:
        time_ids = [[side * 8, side * 8, 0, 0, side * 8, side * 8]] * point.batch
        kwargs["added_cond_kwargs"] = sdxl_added_conditions(pooled, time_ids, dtype)
    with _forward_autocast(mode, precision):
        prediction = models.unet(noisy.to(dtype), timesteps, embeds.to(dtype), **kwargs).sample
        if precision != "fp32":
            prediction = _to_fp32(prediction)
    mode.autocast_active = False
    target = training_target(scheduler, latents, noise, timesteps, "epsilon")
    losses = per_sample_loss(
        prediction, target, timesteps, alphas_cumprod=scheduler.alphas_cumprod, prediction_type="epsilon"
    )
    return losses.sum() / point.batch


def trace_sd_unet(
    configs: dict[str, dict[str, Any]], regime: Regime, points: list[Point], device: str = "meta"
) -> list[Trace]:
    """Trace one UNet micro-batch (latents and text embeddings given, text encoders frozen) at each point."""
    traces = []
    for rank, group in _by_rank(points).items():
        models = build_sd(configs, device, regime.precision)
        add_sd_lora(models, regime, rank, train_text_encoder=False)
        models.unet.train()
        for point in group:
            meter = _meter_for([models.unet])
            static = meter.live_bytes
            mode = _trace_mode(regime.precision, device)
            with _enter(mode, regime.precision, device), meter:
                embeds, pooled = _text_inputs(models, point.batch, device)
                loss = _unet_loss(models, point, device, mode, regime.precision, embeds, pooled)
                del embeds, pooled
                mode.autocast_active = regime.precision != "fp32"
                _backward(loss)
                mode.autocast_active = False
                del loss
            traces.append(_finish(meter, point, static))
            _clear_grads(models.unet)
    return traces


def trace_sd_text_training(
    configs: dict[str, dict[str, Any]], regime: Regime, points: list[Point], device: str = "meta"
) -> list[Trace]:
    """What training the text encoder(s) holds during the UNet pass: their saved activations (forward only)."""
    traces = []
    for rank, group in _by_rank(points).items():
        models = build_sd(configs, device, regime.precision)
        add_sd_lora(models, regime, rank, train_text_encoder=True)
        for encoder in models.text_encoders:
            encoder.train()
        for point in group:
            meter = _meter_for(models.text_encoders)
            static = meter.live_bytes
            mode = _trace_mode(regime.precision, device)
            with _enter(mode, regime.precision, device), meter:
                mode.autocast_active = regime.precision != "fp32"
                embeds, pooled = _encode_text(models, point.batch, device)
                mode.clear_cache()
                mode.autocast_active = False
                held = meter.live_bytes - static
                del embeds, pooled
            trace = _finish(meter, point, static)
            trace.peak, trace.activations = max(held, 0), max(held, 0)
            traces.append(trace)
    return traces


def trace_sd_encode(
    configs: dict[str, dict[str, Any]], precision: str, points: list[Point], what: str, device: str = "meta"
) -> list[Trace]:
    """Peak above the weights of encoding one micro-batch without gradients: `what` is "vae" or "text"."""
    models = build_sd(configs, device, precision)
    parts = [models.vae] if what == "vae" else models.text_encoders
    traces = []
    for point in points:
        meter = _meter_for(parts)
        static = meter.live_bytes
        with _enter(TraceMode(None), "fp32", device), meter, torch.no_grad():
            if what == "vae":
                side = max(8, round(point.tokens**0.5) * 8)
                dtype = next(models.vae.parameters()).dtype
                pixels = _tensor((point.batch, 3, side, side), device).to(dtype)
                posterior = models.vae.encode(pixels).latent_dist
                latents = (posterior.mode() * float(models.vae.config.scaling_factor)).float()
                del pixels, posterior, latents
            else:
                embeds, pooled = _encode_text(models, point.batch, device)
                del embeds, pooled
        traces.append(_finish(meter, point, static))
    return traces
