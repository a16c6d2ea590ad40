"""Predict the peak device memory of a training config, with a breakdown, before any weights are loaded.

peak = frozen weights + LoRA parameters + optimizer state
       + max(forward/backward of one micro-batch, optimizer step, VAE / text encoding)
       (+ on CUDA: context, library workspaces, allocator fragmentation)

Parameter counts come from the model's own configs (built on the meta device, or shipped tables); the
forward/backward term comes from a fitted model of traced reference steps (`fit`); optimizer state and
temporaries, 4-bit storage and CUDA overheads are computed. See docs/memory.md for the method and its
measured error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from loratui.memory.arch import ArchSpec
from loratui.memory.estimate_types import (
    NF4_BYTES,
    Estimate,
    _band,
    cuda_overheads,
)
from loratui.memory.methods import has_reference_pass, method_note, sequences_per_sample
from loratui.memory.regime import Regime
from loratui.memory.summary import ArchSummary, llm_target_problem


class UnknownArchitecture(ValueError):
    """The model's configs cannot be turned into a model here (unknown model type, broken config)."""


# --- planning objects ----------------------------------------------------------------------------------------


@dataclass
class Planner:
    """Architecture + summary of one base model; estimates many configs of it quickly."""

    spec: ArchSpec
    summary: ArchSummary | None  # None: analytic fallback
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.summary.components.values()) if self.summary else 0

    def trace_source(self) -> str:
        """Where fits come from: this CPU for small architectures, the meta device otherwise."""
        from loratui.memory.fit import CPU_TRACE_PARAM_LIMIT
        from loratui.memory.tables import table_for

        if table_for(self.spec.fingerprint) is not None:
            return "meta"
        return "cpu" if 0 < self.params <= CPU_TRACE_PARAM_LIMIT else "meta"

    def estimate(self, cfg: Any, device: str = "cuda") -> Estimate:
        if self.summary is None:
            from loratui.memory.analytic import analytic_estimate

            return analytic_estimate(self.spec, cfg, device, self.notes)
        if self.spec.kind == "llm":
            try:
                return _estimate_llm(self, cfg, device)
            except (ValueError, NotImplementedError) as exc:  # built, but its step cannot be traced
                from loratui.memory.analytic import analytic_estimate

                why = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
                note = (
                    f"cannot trace a training step of this architecture ({why}); using the analytic estimate"
                )
                return analytic_estimate(self.spec, cfg, device, [*self.notes, note])
        return _estimate_sd(self, cfg, device)


_PLANNERS: dict[tuple, Planner] = {}


def planner_for(cfg: Any, family: str | None = None) -> Planner:
    """The `Planner` for a config's base model (cached per base model and family)."""
    import sys

    from loratui.memory.arch import arch_from_config
    from loratui.memory.flux import flux_family, flux_planner

    inner = getattr(cfg, "config", cfg)
    flux = flux_family(inner, family or getattr(cfg, "family", None))
    if flux is not None:  # FLUX.1 / Chroma: `loratui.memory.flux`
        return flux_planner(inner, flux, sys.modules[__name__])  # type: ignore[return-value]
    spec = arch_from_config(cfg, family)
    key = (spec.fingerprint, spec.kind)
    if key in _PLANNERS:
        found = _PLANNERS[key]
        return Planner(spec, found.summary, list(spec.notes) + found.notes[len(found.spec.notes) :])
    notes = list(spec.notes)
    summary = _summary(spec, notes, inner)
    planner = Planner(spec, summary, notes)
    _PLANNERS[key] = planner
    return planner


def _summary(spec: ArchSpec, notes: list[str], cfg: Any) -> ArchSummary | None:
    from loratui.memory.tables import cached_summary, store_summary

    found = cached_summary(spec)
    if found is not None:
        return ArchSummary.from_dict(found)
    from loratui.memory.summary import build_summary

    try:
        summary = build_summary(spec)
    except Exception as exc:  # unknown model_type, config the libraries reject, missing optional package
        reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}" if str(exc) else type(exc).__name__
        notes.append(
            f"cannot build the architecture of {cfg.base_model or spec.source} from its config ({reason}); "
            "using the analytic estimate (wider error)"
        )
        return None
    store_summary(spec, summary.to_dict())
    return summary


# --- shared pieces ---------------------------------------------------------------------------------------------


def regime_for(cfg: Any, device: str, kind: str) -> tuple[Regime, list[str]]:
    """The precision regime a config trains in on `device`, and notes about it."""
    notes: list[str] = []
    targets = tuple(cfg.target_modules) if cfg.target_modules else None
    if targets is None and kind == "llm":
        targets = ("all-linear",)  # the LLM default of every family (loratui.models.llm.families)
    dropout = cfg.lora_dropout > 0
    if device == "cuda":
        sixteen = cfg.mixed_precision != "no"
    else:
        sixteen = cfg.mixed_precision == "bf16"
        if sixteen:
            notes.append("bf16 on the CPU is estimated with CUDA's autocast rules")
    if cfg.load_in_4bit and kind == "llm":
        precision = "qlora16" if sixteen else "qlora32"  # NF4 base; other weights in the compute dtype
    else:
        precision = "amp16" if sixteen else "fp32"
    llm = kind == "llm"
    # under FSDP the trainer computes the full logits (the LM head is gathered only inside the model's forward)
    chunked = llm and bool(getattr(cfg, "chunked_loss", False)) and not getattr(cfg, "fsdp", False)
    offload = llm and device == "cuda" and bool(getattr(cfg, "activation_offload", False))
    if llm and device != "cuda" and getattr(cfg, "activation_offload", False):
        notes.append("activation_offload does nothing on the CPU (activations already are in host memory)")
    regime = Regime(
        precision,
        cfg.gradient_checkpointing,
        dropout,
        targets,
        network=_network_key(cfg, kind),
        chunked_loss=chunked,
        offload=offload,
    )
    return regime, notes


def _network_key(cfg: Any, kind: str) -> str:
    """The SD adapter type and options that shape activation memory (LLM runs train LoRA)."""
    if kind != "sd" or getattr(cfg, "adapter_type", "lora") == "lora":
        return "lora"
    from loratui.models.sd.adapters import spec_from_config, spec_key

    return spec_key(spec_from_config(cfg))


def lora_width(cfg: Any) -> int:
    """Bytes per LoRA weight element (`lora_dtype`, LLMs)."""
    return 2 if getattr(cfg, "lora_dtype", "fp32") == "bf16" else 4


def weight_bytes(precision: str) -> int:
    """Bytes per frozen 16/32-bit weight (under QLoRA: per weight that is not quantised)."""
    return 4 if precision in ("fp32", "qlora32") else 2


#: optimizers whose state depends on tensor shapes (not only sizes): `optimizer_bytes` needs `shapes`
SHAPED_OPTIMIZERS = ("prodigy", "adafactor", "schedulefree_adamw", "came", "lion")


def _factored(shape: tuple[int, ...]) -> int:
    """Elements of a row + a column second-moment vector (Adafactor, CAME) of a tensor of 2+ dimensions."""
    rows = 1
    for size in shape[:-1]:
        rows *= size
    return rows + rows // shape[-2] * shape[-1]


def state_elements(name: str, shape: tuple[int, ...], zero: bool, args: dict[str, Any] | None = None) -> int:
    """fp32 elements the optimizer keeps for one trainable tensor (read from each package's `step()`):

    prodigy: exp_avg (when beta1 > 0), exp_avg_sq, s and the start copy p0 (every slice_p-th element; a 0-d
    tensor for a tensor that starts at zero, like LoRA's B); adafactor: factored row + column second moment for
    2+ dimensions, else a full one (+ exp_avg when beta1 is set; + the 0-d RMS); schedulefree_adamw: z and exp_avg_sq; came:
    exp_avg plus factored second moment and factored residual (1-D: exp_avg_sq) and RMS; lion: exp_avg."""
    args = args or {}
    numel = 1
    for size in shape:
        numel *= size
    factored = len(shape) >= 2
    if name == "prodigy":
        sliced = -(-numel // int(args.get("slice_p", 1)))
        first = numel if float((args.get("betas") or (0.9,))[0]) > 0 else 0
        return first + numel + sliced + (1 if zero else sliced)
    if name == "adafactor":
        first = numel if args.get("beta1") is not None else 0
        return first + (_factored(shape) if factored else numel) + 1  # + RMS, a 0-d tensor
    if name == "schedulefree_adamw":
        return 2 * numel
    if name == "came":
        return numel + (2 * _factored(shape) if factored else numel) + 1  # + RMS, a 0-d tensor
    if name == "lion":
        return numel
    raise ValueError(f"no state layout for optimizer {name!r}")


def optimizer_bytes(
    name: str,
    tensors: list[tuple[int, int]],
    rank: int,
    device: str,
    shapes: list[tuple[tuple[int, ...], int, bool]] | None = None,
    args: dict[str, Any] | None = None,
    width: int = 4,
) -> tuple[int, int]:
    """(state bytes, temporaries during `step()`) for the LoRA tensors [(elements per rank, count)]; optimizers
    in SHAPED_OPTIMIZERS read `shapes` [(shape, count, starts at zero)] (default: each tensor as 1-D, which
    over-counts factored state). AdamW keeps its moments in the LoRA weights' dtype (`width` bytes an element)."""
    numels = [(per_rank * rank, count) for per_rank, count in tensors]
    total = sum(n * c for n, c in numels)
    biggest = max((n for n, _ in numels), default=0)
    count = sum(c for _, c in numels)
    if name == "adamw8bit":
        state = 0
        for n, c in numels:
            state += c * (2 * n + 2 * 4 * -(-n // 256) if n >= 4096 else 8 * n)
        return state, 0
    if name in SHAPED_OPTIMIZERS:
        shapes = shapes if shapes is not None else [((n,), c, False) for n, c in numels]
        state = sum(4 * c * state_elements(name, shape, zero, args) for shape, c, zero in shapes)
        if name == "schedulefree_adamw":  # foreach: one denominator per tensor at once
            return state, 4 * total
        return state, 2 * 4 * biggest  # per tensor: update and denominator of the largest
    state = 2 * width * total + (4 * count if device == "cpu" else 0)  # exp_avg, exp_avg_sq (+ CPU steps)
    temporaries = width * total if device == "cuda" else 2 * width * biggest  # foreach sqrt copy / per-tensor
    return state, temporaries


def _method(source: str, table: bool) -> str:
    where = "this CPU (random weights)" if source == "cpu" else "the meta device (CUDA autocast emulated)"
    shipped = ", shipped table" if table else ""
    return f"traced reference step on {where}, fitted in batch/tokens/rank{shipped}; optimizer and overheads computed"


def _finish(
    parts: dict[str, int], phases: dict[str, float], static: int, kind: str, device: str
) -> tuple[dict[str, int], str]:
    phase = max(phases, key=lambda k: phases[k])
    if device == "cuda":
        parts.update(cuda_overheads(kind, int(phases[phase]), static))
    return {k: int(v) for k, v in parts.items()}, phase


def step_parts(peak: float, acts: float, lora: int, accumulating: bool) -> tuple[float, int, int]:
    """(micro-batch peak, activations, gradients at that peak).

    The first micro-batch's peak includes the gradients produced so far; with accumulation, later micro-batches
    run with every gradient already allocated."""
    grads_at_peak = int(min(lora, max(peak - acts, 0)))
    if accumulating and acts + lora > peak:
        return acts + lora, int(acts), lora
    return peak, int(peak - grads_at_peak), grads_at_peak


# --- causal LMs ------------------------------------------------------------------------------------------------


def _estimate_llm(planner: Planner, cfg: Any, device: str) -> Estimate:
    from loratui.memory.tables import get_fit, table_for

    summary = planner.summary
    model = summary.components["model"]
    regime, notes = regime_for(cfg, device, "llm")
    notes = planner.notes + notes
    problem = llm_target_problem(
        model.layers, cfg.target_modules, summary.info.get("model_type"), cfg.lora_dropout
    )
    if problem:
        notes.append(f"the trainer will refuse this model: {problem}")
    source = planner.trace_source()
    fit = get_fit(planner.spec, regime, source)
    b, s, r = cfg.batch_size * sequences_per_sample(cfg), cfg.max_seq_len, cfg.lora_rank  # DPO/ORPO: pairs
    layers = int(summary.info.get("layers", 1))
    if method_note(cfg):
        notes = [*notes, method_note(cfg)]
    peak, acts = fit.evaluate(b, s, r, layers)
    if (
        regime.chunked_loss
    ):  # never above the full-logits step (see docs/memory.md, "LLM options in the trace")
        full_peak, full_acts = get_fit(planner.spec, replace(regime, chunked_loss=False), source).evaluate(
            b, s, r, layers
        )
        peak, acts = min(peak, full_peak), min(acts, full_acts)
    width = weight_bytes(regime.precision)
    if regime.precision.startswith(
        "qlora"
    ):  # NF4 decoder Linears; embeddings, norms, lm_head in compute dtype
        weights = model.quantizable * NF4_BYTES + (model.params - model.quantizable) * width
    else:
        weights = model.params * width
    weights += model.buffers * 4
    lora_bytes = lora_width(cfg)
    lora = lora_bytes * summary.lora_params(r, cfg.target_modules, lora_dropout=cfg.lora_dropout)
    tensors = summary.lora_tensors(cfg.target_modules, lora_dropout=cfg.lora_dropout)
    shapes = summary.lora_shapes(r, cfg.target_modules, lora_dropout=cfg.lora_dropout)
    state, temporaries = optimizer_bytes(
        cfg.optimizer, tensors, r, device, shapes, cfg.optimizer_args, width=lora_bytes
    )
    if (
        lora_bytes != 4
    ):  # traced with fp32 LoRA: its gradients at the peak take `lora_bytes` an element instead
        fp32_lora = 4 * summary.lora_params(r, cfg.target_modules, lora_dropout=cfg.lora_dropout)
        peak -= min(fp32_lora, max(peak - acts, 0)) * (4 - lora_bytes) / 4
    mask = b * s * s  # boolean 4-D attention mask for padded or packed rows
    peak, acts = peak + mask, acts + mask
    step, activations, grads_at_peak = step_parts(peak, acts, lora, cfg.gradient_accumulation_steps > 1)
    head, _ = fit.evaluate(b, s, r, 0)
    logits = int(min(max(head, 0), activations))
    phases = {"micro-batch forward/backward": step, "optimizer step": lora + temporaries}
    if has_reference_pass(cfg):  # DPO: the rows again without gradients (their logits; no activations kept)
        accumulated = lora if cfg.gradient_accumulation_steps > 1 else 0
        phases["reference forward (no grad)"] = min(logits + mask, activations) + accumulated
    static = weights + lora + state
    if phases["optimizer step"] >= step:
        parts = {
            "weights": weights,
            "lora_params": lora,
            "optimizer_state": state,
            "gradients": lora,
            "optimizer_temporaries": temporaries,
        }
    else:
        parts = {
            "weights": weights,
            "lora_params": lora,
            "optimizer_state": state,
            "gradients": grads_at_peak,
            "activations": activations - logits,
            "logits_loss": logits,
        }
    parts, phase = _finish(parts, phases, int(static), "llm", device)
    return Estimate(
        sum(parts.values()),
        parts,
        _method(source, table_for(planner.spec.fingerprint) is not None),
        _band(source, fit.residual, device),
        notes,
        phase,
        device,
    )


# --- Stable Diffusion ------------------------------------------------------------------------------------------


@dataclass
class _SDWeights:
    unet: int
    text_encoders: int
    vae: int


def _sd_weights(summary: ArchSummary, precision: str) -> _SDWeights:
    """Frozen weights in the SD trainer's dtypes (16-bit, or fp32; SDXL's VAE always fp32)."""
    comps = summary.components
    width = weight_bytes(precision)
    vae_width = 4 if summary.info.get("sdxl") or precision == "fp32" else 2
    encoders = [n for n in ("text_encoder", "text_encoder_2") if n in comps]
    return _SDWeights(
        (comps["unet"].params + comps["unet"].buffers) * width,
        sum(comps[n].params + comps[n].buffers for n in encoders) * width,
        (comps["vae"].params + comps["vae"].buffers) * vae_width,
    )


def _adapter_fit(planner: Planner, regime: Regime, source: str, what: str, cfg: Any, notes: list[str]):
    """(fit, extra bytes): the traced fit of the regime's adapter type; when that trace fails (LoHa's backward
    on the meta device), LoRA's fit plus the full-size weight change each adapted module keeps for backward."""
    from loratui.memory.tables import get_fit

    if regime.network == "lora":
        return get_fit(planner.spec, regime, source, what), 0
    try:
        return get_fit(planner.spec, regime, source, what), 0
    except RuntimeError as exc:
        from loratui.memory.summary import sd_adapter_layers
        from loratui.models.sd.adapters import spec_from_key, transient_numel

        spec = spec_from_key(regime.network)
        train_te = what == "text_training"
        chosen = sd_adapter_layers(
            planner.summary.components,
            planner.summary.lora_layers(cfg.target_modules, train_text_encoder=train_te),
            spec,
        )
        names = [n for n in chosen if (n != "unet") == train_te]
        numel = sum(
            transient_numel(spec, layer.d_in, layer.d_out, layer.kernel) * layer.count
            for name in names
            for layer in chosen[name]
        )
        width = (
            4 if regime.precision == "fp32" else 2
        )  # the delta as the layer's op saves it (autocast: 16-bit)
        notes.append(
            f"{spec.kind} {what} memory: LoRA's traced step plus one full-size weight change per adapted module "
            f"(the {spec.kind} trace failed here: {str(exc)[:80]})"
        )
        return get_fit(planner.spec, replace(regime, network="lora"), source, what), numel * width


def sd_data_extras(cfg: Any, batch_size: int, vae_factor: int, notes: list[str]) -> int:
    """Bytes the SD micro-batch holds for loss masks (pixel + latent size, fp32); notes for regularization
    images, which share each step's batch (kohya mixes them in) and so change the steps, not the memory."""
    from loratui.models.sd.masks import mask_bytes

    if getattr(cfg, "reg_data_dir", None):
        notes.append(
            "regularization images share each step's batch_size (memory per step unchanged); they double the "
            "steps per epoch"
        )
    if getattr(cfg, "uses_loss_masks", False):
        return mask_bytes(batch_size, cfg.resolution, vae_factor)
    return 0


def _sd_ema_bytes(cfg: Any, lora: int, device: str, notes: list[str]) -> int:
    """The EMA copy of the adapter (`ema_decay`: one more fp32 copy of the LoRA parameters) on the estimated
    device; with `ema_on_cpu` on a GPU it is CPU memory (noted, not counted). Also notes the validation pass."""
    if getattr(cfg, "val_split", 0) or getattr(cfg, "val_data_dir", None):
        notes.append(
            "validation loss: a forward pass without gradients at batch_size, below the training step's peak"
        )
    if getattr(cfg, "ema_decay", None) is None:
        return 0
    if device == "cuda" and getattr(cfg, "ema_on_cpu", False):
        notes.append(
            f"EMA of the LoRA weights: {lora / 2**20:.1f} MiB of CPU memory (ema_on_cpu), not on the GPU"
        )
        return 0
    return lora


def _estimate_sd(planner: Planner, cfg: Any, device: str) -> Estimate:
    """The SD trainer's step; on a GPU its caching passes run before the UNet is moved there (`train/sd/setup.py`)."""
    from loratui.memory.tables import get_fit, table_for
    from loratui.models.sd.conditioning import TEXT_BATCH

    summary = planner.summary
    regime, notes = regime_for(cfg, device, "sd")
    notes = planner.notes + notes
    source = planner.trace_source()
    w = _sd_weights(summary, regime.precision)
    b, r, train_te = cfg.batch_size, cfg.lora_rank, cfg.train_text_encoder
    cache_latents = (cfg.cache_latents or cfg.cache_latents_to_disk) and not cfg.random_crop
    captions_fixed = cfg.caption_dropout == 0 and not cfg.shuffle_tags
    cache_text = cfg.cache_text_encoder_outputs and not train_te and captions_fixed
    on_gpu = device == "cuda"  # (on the CPU nothing moves: every module stays in memory)
    vae_on_device = not (on_gpu and cache_latents)
    text_on_device = not (on_gpu and cache_text)
    tokens = (cfg.resolution // int(summary.info.get("vae_factor", 8))) ** 2
    numels = summary.adapter_numels(regime.network, r, cfg.target_modules, train_text_encoder=train_te)
    lora = 4 * sum(n * c for n, c in numels)
    shapes = (
        summary.lora_shapes(r, cfg.target_modules, train_text_encoder=train_te)
        if regime.network == "lora"
        else None  # LoCon/LoHa/LoKr/DoRA: sizes only (factored optimizer state over-counted, noted)
    )
    if shapes is None and cfg.optimizer in ("adafactor", "came"):
        notes.append(
            f"{cfg.optimizer}'s factored state is counted unfactored for {regime.network} (an upper bound)"
        )
    state, temporaries = optimizer_bytes(cfg.optimizer, numels, 1, device, shapes, cfg.optimizer_args)

    unet_fit, extra = _adapter_fit(planner, regime, source, "step", cfg, notes)
    peak, acts = unet_fit.evaluate(b, tokens, r)
    peak, acts = peak + extra, acts + extra
    if train_te:  # the text encoders' saved activations are held through the UNet pass
        te_fit, te_extra = _adapter_fit(planner, regime, source, "text_training", cfg, notes)
        held = te_fit.evaluate(b, 77, r)[0] + te_extra
        peak, acts = peak + held, acts + held
    accumulating = cfg.gradient_accumulation_steps > 1
    step, activations, grads_at_peak = step_parts(peak, acts, lora, accumulating)
    masks = sd_data_extras(cfg, b, int(summary.info.get("vae_factor", 8)), notes)
    step += masks
    carried = lora if accumulating else 0  # gradients of earlier micro-batches
    plain = Regime(regime.precision)
    vae_peak = get_fit(planner.spec, plain, source, "vae").evaluate(b, tokens, 0)[0]
    text_fit = get_fit(planner.spec, plain, source, "text") if not train_te else None
    phases: dict[str, float] = {"micro-batch forward/backward": step, "optimizer step": lora + temporaries}
    if not cache_latents:
        phases["VAE encoding"] = vae_peak + carried
    if text_fit is not None and not cache_text:
        phases["text encoding"] = text_fit.evaluate(b, 77, 0)[0] + carried
    ema = _sd_ema_bytes(cfg, lora, device, notes)
    weights = w.unet + (w.text_encoders if text_on_device else 0) + (w.vae if vae_on_device else 0)
    static = weights + lora + state + ema
    phase = max(phases, key=lambda k: phases[k])
    common = {"unet_weights": w.unet, "lora_params": lora, "optimizer_state": state}
    if ema:
        common["ema_weights"] = ema
    if text_on_device:
        common["text_encoders"] = w.text_encoders
    if phase == "optimizer step":
        parts = {**common, "gradients": lora, "optimizer_temporaries": temporaries}
    elif phase == "micro-batch forward/backward":
        parts = {**common, "gradients": grads_at_peak, "activations": activations}
        if masks:
            parts["loss_masks"] = masks
    else:
        parts = {**common, "gradients": carried, "encoding": phases[phase] - carried}
    if vae_on_device:
        parts["vae"] = w.vae
    # The caching passes run before LoRA is added and before the UNet is on the device (`train/sd/setup.py`); on the
    # CPU every module is in memory throughout.
    before = {}
    resident = w.unet + w.text_encoders + w.vae if not on_gpu else 0
    if cache_latents:
        held = w.vae if on_gpu else resident
        before["latent caching (before training)"] = ({"vae": w.vae}, held, vae_peak)
    if (
        cache_text and text_fit is not None
    ):  # after the latent pass: the VAE stays when latents are not cached
        vae_part = {} if cache_latents else {"vae": w.vae}
        held = w.text_encoders + sum(vae_part.values()) if on_gpu else resident
        text_peak = text_fit.evaluate(TEXT_BATCH, 77, 0)[0]
        before["text-encoder caching (before training)"] = (
            {"text_encoders": w.text_encoders, **vae_part},
            held,
            text_peak,
        )
    for name, (weights_part, held, encoding) in before.items():
        if held + encoding > static + phases[phase]:
            phases, static = {name: encoding}, int(held)
            parts = {**weights_part, "encoding": encoding}
            if not on_gpu:
                parts = {"unet_weights": w.unet, "text_encoders": w.text_encoders, "vae": w.vae, **parts}
            phase = name
    parts, phase = _finish(parts, phases, int(static), "sd", device)
    if on_gpu and (cache_latents or cache_text):
        moved = [
            n for n, on in (("the VAE", not vae_on_device), ("the text encoders", not text_on_device)) if on
        ]
        notes.append(f"with cached outputs, {' and '.join(moved)} encode before training, then leave the GPU")
        if getattr(cfg, "sample_prompts", None) and moved:
            notes.append(
                f"sample images during training bring {' and '.join(moved)} back to the GPU for a moment: "
                "not included above (a sample that does not fit is skipped with a warning; `loratui sample` "
                "renders them after training)"
            )
    return Estimate(
        sum(parts.values()),
        parts,
        _method(source, table_for(planner.spec.fingerprint) is not None),
        _band(source, unet_fit.residual, device),
        notes,
        phase,
        device,
    )


# --- entry point -----------------------------------------------------------------------------------------------


def unpack_config(resolved_or_config: Any, family: str | None = None) -> tuple[Any, str | None]:
    """(TrainConfig, family) from a ResolvedConfig, TrainConfig or mapping."""
    from loratui.config import TrainConfig

    if isinstance(resolved_or_config, dict):
        return TrainConfig(**resolved_or_config), family
    inner = getattr(resolved_or_config, "config", resolved_or_config)
    return inner, family or getattr(resolved_or_config, "family", None)


def estimate_peak(
    resolved_or_config: Any, *, family: str | None = None, device: str = "cuda", processes: int = 1
) -> Estimate:
    """Predicted peak memory of training this config on `device` ("cuda" or "cpu"), with a breakdown.

    With `processes` > 1 (data-parallel training) the figure is per process / per GPU: `batch_size` is already
    per device, and DDP adds its gradient buckets (a copy of the LoRA gradients). With `fsdp` (LLMs) the
    weights, LoRA, gradients and optimizer state are split over the processes (`loratui.memory.sharding`)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
    cfg, family = unpack_config(resolved_or_config, family)
    planner = planner_for(cfg if family is None else _WithFamily(cfg, family), family)
    return per_process(planner, cfg, planner.estimate(cfg, device), processes, device)


def per_process(planner: Planner, cfg: Any, estimate: Estimate, processes: int, device: str) -> Estimate:
    """What each training process holds: FSDP shards (`fsdp`, LLMs), DDP's full copy with `processes` > 1,
    else the estimate as it is."""
    if getattr(cfg, "fsdp", False) and planner.spec.kind == "llm":
        return _with_fsdp(planner, cfg, estimate, processes, device)
    return with_data_parallel(estimate, processes) if processes > 1 else estimate


def _with_fsdp(planner: Planner, cfg: Any, estimate: Estimate, processes: int, device: str) -> Estimate:
    from loratui.memory.analytic import llm_layers
    from loratui.memory.sharding import largest_group_bytes, sharded_qlora_weights, with_fsdp

    regime, _notes = regime_for(cfg, device, "llm")
    layers = llm_layers(planner.spec)[0] if planner.summary is None else 1
    if regime.precision == "qlora" and planner.summary is not None:
        estimate = sharded_qlora_weights(estimate, planner.summary)
    weights = estimate.breakdown.get("weights", 0)
    group = largest_group_bytes(planner.summary, regime.precision, layers, weights)
    return with_fsdp(estimate, processes, group)


def with_data_parallel(estimate: Estimate, processes: int) -> Estimate:
    """The per-process estimate of DDP training with `processes` ranks (each holds the whole model)."""
    buckets = int(estimate.breakdown.get("lora_params", 0))  # fp32 buckets the size of the LoRA gradients
    breakdown = {**estimate.breakdown, "ddp_buckets": buckets}
    notes = [
        *estimate.notes,
        f"per GPU, for each of {processes} processes (batch_size is per GPU; global batch = batch_size x "
        f"gradient_accumulation_steps x {processes})",
    ]
    if estimate.device == "cuda":
        notes.append("NCCL's own communication buffers are not included (not measured here)")
    return replace(estimate, total_bytes=sum(breakdown.values()), breakdown=breakdown, notes=notes)


@dataclass
class _WithFamily:
    config: Any
    family: str
