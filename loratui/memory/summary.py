"""Parameter counts and LoRA-adaptable layers of an architecture, from a model built on the meta device.

No weights are read or allocated. The summary is plain data (JSON-serialisable), so the estimator can use it
without importing torch; summaries of the architectures loratui knows are shipped as tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from loratui.memory.arch import ArchSpec
from loratui.models.llm.families import matches, plan_targets

#: mirrors loratui.models.sd.lora (tested to agree); kept here so estimates need no torch import
SD_DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
SD_DEFAULT_TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass
class Layer:
    """A Linear or Conv2d module LoRA can adapt, or the fused 3-D weight of an MoE block's experts
    (`experts` > 1: one (in -> r, r -> out) pair per expert, stored by PEFT as one A and one B tensor)."""

    name: str
    d_in: int
    d_out: int
    kernel: int = 1  # kernel area (k*k) for Conv2d, 1 for Linear
    count: int = 1  # how many times it occurs (decoder layers of an LLM share one entry)
    linear: bool = True
    experts: int = 1  # experts of a fused expert weight (its name is `<module>.<parameter>`)
    parameter: bool = False  # a fused expert weight (PEFT target_parameters), not a module

    def lora_params(self, rank: int) -> int:
        """Trainable parameters of a rank-`rank` LoRA on this module (A: in*k -> r, B: r -> out)."""
        return rank * (self.d_in * self.kernel + self.d_out) * self.count * self.experts


@dataclass
class Component:
    """One model of the architecture (UNet, VAE, a text encoder, or the causal LM)."""

    params: int
    buffers: int = 0  # floating-point buffer elements (cast with the weights)
    layers: list[Layer] = field(default_factory=list)
    quantizable: int = 0  # parameters in decoder Linear weights (stored in 4-bit by QLoRA)
    max_linear: int = 0  # elements of the largest such weight


@dataclass
class ArchSummary:
    """Everything the estimator needs to know about an architecture's parameters."""

    kind: str
    family: str
    fingerprint: str
    components: dict[str, Component]
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSummary:
        comps = {}
        for name, comp in data["components"].items():
            layers = [Layer(**layer) for layer in comp.get("layers", [])]
            comps[name] = Component(**{**comp, "layers": layers})
        return cls(data["kind"], data["family"], data["fingerprint"], comps, dict(data.get("info", {})))

    # --- LoRA parameter counts ---------------------------------------------------------------------------

    def lora_layers(
        self, target_modules: list[str] | None, *, train_text_encoder: bool = False, lora_dropout: float = 0.0
    ) -> dict:
        """component -> adapted layers, as the trainers choose them (memoised: the recommender asks often)."""
        key = (tuple(target_modules) if target_modules else None, train_text_encoder, lora_dropout > 0)
        cache = self.__dict__.setdefault("_chosen", {})
        if key not in cache:
            if self.kind == "llm":
                layers = self.components["model"].layers
                model_type = self.info.get("model_type")
                cache[key] = {"model": llm_targets(layers, target_modules, model_type, lora_dropout)}
            else:
                cache[key] = sd_targets(
                    self.components, target_modules, train_text_encoder=train_text_encoder
                )
        return cache[key]

    def lora_params(
        self,
        rank: int,
        target_modules: list[str] | None,
        *,
        train_text_encoder: bool = False,
        lora_dropout: float = 0.0,
    ) -> int:
        """Trainable LoRA parameters at `rank` (linear in the rank)."""
        tensors = self.lora_tensors(
            target_modules, train_text_encoder=train_text_encoder, lora_dropout=lora_dropout
        )
        return rank * sum(per_rank * count for per_rank, count in tensors)

    def adapter_numels(
        self, network: str, rank: int, target_modules: list[str] | None, *, train_text_encoder: bool = False
    ) -> list[tuple[int, int]]:
        """(elements, how many tensors) of an SD adapter's trainable tensors (`network`: `spec_key`), by size.

        Plain LoRA is `lora_tensors` at `rank`; LoCon/LoHa/LoKr add the ResNet convolutions, LoHa has two
        low-rank pairs, LoKr a Kronecker pair (not linear in the rank), DoRA a magnitude per output channel.
        """
        from loratui.models.sd.adapters import adapter_numels, spec_from_key

        if network == "lora":
            return [
                (per_rank * rank, count)
                for per_rank, count in self.lora_tensors(
                    target_modules, train_text_encoder=train_text_encoder
                )
            ]
        spec = spec_from_key(network)
        chosen = sd_adapter_layers(
            self.components, self.lora_layers(target_modules, train_text_encoder=train_text_encoder), spec
        )
        sizes: dict[int, int] = {}
        for layers in chosen.values():
            for layer in layers:
                conv3x3 = not layer.linear and layer.kernel > 1
                for numel in adapter_numels(
                    spec, layer.d_in, layer.d_out, layer.kernel, rank, conv3x3=conv3x3
                ):
                    sizes[numel] = sizes.get(numel, 0) + layer.count
        return sorted(sizes.items())

    def lora_shapes(
        self,
        rank: int,
        target_modules: list[str] | None,
        *,
        train_text_encoder: bool = False,
        lora_dropout: float = 0.0,
    ) -> list[tuple[tuple[int, ...], int, bool]]:
        """(shape, how many tensors, starts at zero) of each LoRA weight as PEFT stores it: A (r, in) or
        (r, in, k, k) for a convolution, B (out, r) or (out, r, 1, 1), zero at the start. Factored optimizers
        (Adafactor, CAME) keep a row and a column vector per tensor of two or more dimensions."""
        shapes: dict[tuple[tuple[int, ...], bool], int] = {}
        chosen = self.lora_layers(
            target_modules, train_text_encoder=train_text_encoder, lora_dropout=lora_dropout
        )
        for layers in chosen.values():
            for layer in layers:
                r = rank * layer.experts
                if layer.linear:
                    pair = ((r, layer.d_in), (layer.d_out, r))
                else:
                    side = max(1, round(layer.kernel**0.5))
                    pair = ((r, layer.d_in, side, layer.kernel // side), (layer.d_out, r, 1, 1))
                for shape, zero in zip(pair, (False, True), strict=True):
                    shapes[(shape, zero)] = shapes.get((shape, zero), 0) + layer.count
        return sorted((shape, count, zero) for (shape, zero), count in shapes.items())

    def lora_tensors(
        self, target_modules: list[str] | None, *, train_text_encoder: bool = False, lora_dropout: float = 0.0
    ) -> list[tuple]:
        """(elements per rank, how many tensors) of the LoRA weights (A and B), grouped by size."""
        key = (
            "tensors",
            tuple(target_modules) if target_modules else None,
            train_text_encoder,
            lora_dropout > 0,
        )
        cache = self.__dict__.setdefault("_chosen", {})
        if key not in cache:
            sizes: dict[int, int] = {}
            chosen = self.lora_layers(
                target_modules, train_text_encoder=train_text_encoder, lora_dropout=lora_dropout
            )
            for layers in chosen.values():
                for layer in layers:
                    for per_rank in (layer.d_in * layer.kernel * layer.experts, layer.d_out * layer.experts):
                        sizes[per_rank] = sizes.get(per_rank, 0) + layer.count
            cache[key] = sorted(sizes.items())
        return cache[key]


def sd_adapter_layers(components: dict[str, Component], chosen: dict[str, list[Layer]], spec) -> dict:
    """`chosen` plus, for LoCon/LoHa/LoKr, the UNet's ResNet convolutions (`plan_targets(convs=True)`)."""
    from loratui.models.sd.adapters import conv_paths

    if not spec.adapts_convs:
        return chosen
    unet = {layer.name: layer for layer in components["unet"].layers}
    names = {layer.name for layer in chosen["unet"]} | set(conv_paths(list(unet)))
    return {**chosen, "unet": [unet[n] for n in sorted(names)]}


def match_sd(paths: list[str], target: str) -> list[str]:
    """`loratui.models.sd.lora.match_targets`: exact path, suffix or sub-path."""
    needle = f".{target.strip('.')}."
    return [p for p in paths if p == target or needle in f".{p}."]


def sd_targets(
    components: dict[str, Component], requested: list[str] | None, *, train_text_encoder: bool
) -> dict[str, list[Layer]]:
    """`loratui.models.sd.lora.plan_targets` on a summary (unknown targets are ignored here)."""
    by_name = {name: {layer.name: layer for layer in comp.layers} for name, comp in components.items()}
    encoders = [n for n in ("text_encoder", "text_encoder_2") if n in components]
    unet_req = [t for t in requested or [] if match_sd(list(by_name["unet"]), t)]
    te_req = [t for t in requested or [] if any(match_sd(list(by_name[n]), t) for n in encoders)]
    chosen = {"unet": _pick(by_name["unet"], unet_req or list(SD_DEFAULT_UNET_TARGETS))}
    if train_text_encoder:
        for name in encoders:
            chosen[name] = _pick(by_name[name], te_req or list(SD_DEFAULT_TE_TARGETS))
    return chosen


def _pick(layers: dict[str, Layer], targets: list[str]) -> list[Layer]:
    names = sorted({p for t in targets for p in match_sd(list(layers), t)})
    return [layers[n] for n in names]


def llm_target_problem(
    layers: list[Layer], requested: list[str] | None, model_type: str | None = None, lora_dropout: float = 0.0
) -> str | None:
    """Why the LLM trainer would refuse these targets on this architecture (None: it would not)."""
    linear = [layer.name for layer in layers if layer.linear and not layer.parameter]
    experts = [layer.name for layer in layers if layer.parameter]
    try:
        plan_targets(model_type, linear, experts, requested, lora_dropout=lora_dropout)
    except ValueError as exc:
        return str(exc)
    return None


def llm_targets(
    layers: list[Layer], requested: list[str] | None, model_type: str | None = None, lora_dropout: float = 0.0
) -> list[Layer]:
    """The layers the LLM trainer adapts (`loratui.models.llm.families.plan_targets`, then PEFT's name matching).
    An architecture the trainer refuses gets no LoRA here (the trainer's message says what to set)."""
    linear = [layer.name for layer in layers if layer.linear and not layer.parameter]
    experts = [layer.name for layer in layers if layer.parameter]
    try:
        plan = plan_targets(model_type, linear, experts, requested, lora_dropout=lora_dropout)
    except ValueError:  # UnsupportedArchitecture, or names the model does not have
        return []
    chosen = []
    for layer in layers:
        wanted = plan.parameters if layer.parameter else plan.modules
        if layer.linear and any(matches(layer.name, t) for t in wanted):
            chosen.append(layer)
    return chosen


# --- building summaries (torch, meta device) -----------------------------------------------------------------


def _component(model: Any, decoder_prefix: str | None = None) -> Component:
    import torch

    layers = []
    quantizable = max_linear = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layers.append(Layer(name, module.in_features, module.out_features))
            if decoder_prefix and decoder_prefix in name:
                quantizable += module.weight.numel()
                max_linear = max(max_linear, module.weight.numel())
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            layers.append(Layer(name, module.in_channels, module.out_channels, k, linear=False))
        elif decoder_prefix:
            layers.extend(_expert_layers(name, module))
    buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    return Component(sum(p.numel() for p in model.parameters()), buffers, layers, quantizable, max_linear)


def _expert_layers(name: str, module: Any) -> list[Layer]:
    """Fused 3-D expert weights `(experts, out, in)` of an MoE block (`(experts, in, out)` when the module says
    `is_transposed`), with the in/out sizes PEFT's `target_parameters` LoRA uses."""
    found = []
    for pname, param in module.named_parameters(recurse=False):
        if param.ndim == 3 and name:
            experts, a, b = param.shape
            d_in, d_out = (a, b) if getattr(module, "is_transposed", False) else (b, a)
            found.append(
                Layer(f"{name}.{pname}", int(d_in), int(d_out), experts=int(experts), parameter=True)
            )
    return found


def _llm_summary(spec: ArchSpec) -> ArchSummary:
    from loratui.memory.probe import build_llm

    config = spec.configs["model"]
    total_layers = spec.num_layers
    one = _component(build_llm(config, 1, "meta", _float32()), ".layers.")
    two = _component(build_llm(config, 2, "meta", _float32()), ".layers.")
    extra = total_layers - 1

    def grow(a: int, b: int) -> int:
        return a + extra * (b - a)

    layers = []
    for layer in one.layers:
        if ".layers.0." in layer.name:
            layer.count = total_layers
        layers.append(layer)
    comp = Component(
        grow(one.params, two.params),
        grow(one.buffers, two.buffers),
        layers,
        grow(one.quantizable, two.quantizable),
        one.max_linear,
    )
    from loratui.config.base_model import llm_dimension

    def dimension(name: str) -> int:  # under the family's own key (`hidden_size`, `n_embed`, ...)
        found = llm_dimension(config, name)
        return found[0] if found else 0

    info = {
        "layers": total_layers,
        "hidden": dimension("hidden"),
        "vocab": dimension("vocab"),
        "heads": dimension("heads"),
        "intermediate": dimension("intermediate"),
        "model_type": config.get("text_config", config).get("model_type"),
    }
    return ArchSummary("llm", "llm", spec.fingerprint, {"model": comp}, info)


def _float32():
    import torch

    return torch.float32


def _sd_summary(spec: ArchSpec) -> ArchSummary:
    from loratui.memory.probe import build_sd

    models = build_sd(spec.configs, "meta", "fp32")
    comps = {"unet": _component(models.unet), "vae": _component(models.vae)}
    for name, encoder in zip(("text_encoder", "text_encoder_2"), models.text_encoders, strict=False):
        comps[name] = _component(encoder)
    vae_cfg = spec.configs["vae"]
    info = {
        "latent_channels": int(spec.configs["unet"].get("in_channels", 4)),
        "vae_factor": 2 ** (len(vae_cfg.get("block_out_channels", [1, 1, 1, 1])) - 1),
        "text_tokens": 77,
        "sdxl": spec.sdxl,
    }
    return ArchSummary("sd", spec.family, spec.fingerprint, comps, info)


def build_summary(spec: ArchSpec) -> ArchSummary:
    """Summarise an architecture by building it on the meta device (imports torch and diffusers/transformers)."""
    from loratui.models.sd.loading import quiet_libraries

    with quiet_libraries():
        return _llm_summary(spec) if spec.kind == "llm" else _sd_summary(spec)
