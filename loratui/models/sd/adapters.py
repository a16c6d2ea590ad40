"""SD adapter types: which PEFT tuner each `network_type` uses, which modules it adapts, its parameters.

- `lora`: LoRA on the target Linear layers (PEFT `LoraConfig`);
- `locon`: LoRA on the targets and on the UNet's ResNet convolutions (`conv_rank`/`conv_alpha` on 3x3 kernels);
- `loha`: LyCORIS LoHa, a Hadamard product of two low-rank pairs (PEFT `LoHaConfig`), targets + convolutions;
- `lokr`: LyCORIS LoKr, a Kronecker product (PEFT `LoKrConfig`: `factor`, `decompose_both`), targets + convs;
- `dora`: weight-decomposed LoRA (PEFT `LoraConfig(use_dora=True)`), a magnitude per output channel.

PEFT's LoHa/LoKr/DoRA tensors are the LyCORIS ones up to names and scale (see `loratui.models.sd.lycoris`).
No torch import at module level: the planner reads `conv_paths` and `adapter_numels` without torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NETWORK_TYPES = ("lora", "locon", "loha", "lokr", "dora")
#: adapter types that also adapt the UNet's ResNet convolutions
CONV_TYPES = ("locon", "loha", "lokr")
#: pieces of a trainable adapter parameter's name (PEFT layers)
PARAM_MARKERS = (".lora_A.", ".lora_B.", ".lora_magnitude_vector.", ".hada_", ".lokr_")
_CONV = re.compile(r"(^|\.)resnets\.\d+\.(conv1|conv2|conv_shortcut)$")


@dataclass(frozen=True)
class NetworkSpec:
    """The adapter type and its knobs (rank and alpha of Linear layers live in `LoraPlan`)."""

    kind: str = "lora"
    conv_rank: int | None = None  # 3x3 convolutions; None: the linear rank
    conv_alpha: float | None = None  # None: conv_rank (scale 1) when conv_rank is set, else the linear alpha
    factor: int = -1  # LoKr
    decompose_both: bool = False  # LoKr
    use_tucker: bool = False  # LoHa/LoKr 3x3 convolutions

    @property
    def adapts_convs(self) -> bool:
        return self.kind in CONV_TYPES

    @property
    def peers_module(self) -> str:
        """`ss_network_module` as kohya sd-scripts (lora, locon) or LyCORIS (loha, lokr, dora) write it."""
        return "networks.lora" if self.kind in ("lora", "locon") else "lycoris.kohya"


def spec_from_config(cfg) -> NetworkSpec:
    return NetworkSpec(
        kind=cfg.adapter_type,
        conv_rank=cfg.conv_rank,
        conv_alpha=cfg.conv_alpha,
        factor=cfg.lokr_factor,
        decompose_both=cfg.decompose_both,
        use_tucker=cfg.use_tucker,
    )


def spec_key(spec: NetworkSpec) -> str:
    """A compact text form of a spec (`loha`, `lokr;factor=4;decompose_both=True`): part of the planner's fit key."""
    parts = [spec.kind]
    for name, default in (
        ("conv_rank", None),
        ("conv_alpha", None),
        ("factor", -1),
        ("decompose_both", False),
        ("use_tucker", False),
    ):
        value = getattr(spec, name)
        if value != default:
            parts.append(f"{name}={value}")
    return ";".join(parts)


def spec_from_key(key: str) -> NetworkSpec:
    kind, *parts = key.split(";")
    values: dict[str, object] = {}
    for part in parts:
        name, _, text = part.partition("=")
        values[name] = {"conv_rank": int, "conv_alpha": float, "factor": int}.get(
            name, lambda t: t == "True"
        )(text)
    return NetworkSpec(kind, **values)  # type: ignore[arg-type]


def conv_paths(paths: list[str]) -> list[str]:
    """The UNet convolutions LoCon/LoHa/LoKr adapt besides the targets: every ResNet block's convs."""
    return [p for p in paths if _CONV.search(p)]


def is_adapter_param(name: str) -> bool:
    return any(marker in name for marker in PARAM_MARKERS)


def conv_rank_alpha(spec: NetworkSpec, rank: int, alpha: float) -> tuple[int, float]:
    """(rank, alpha) of a 3x3 convolution."""
    if spec.conv_rank is None:
        return rank, float(spec.conv_alpha if spec.conv_alpha is not None else alpha)
    return spec.conv_rank, float(spec.conv_alpha if spec.conv_alpha is not None else spec.conv_rank)


def network_args(spec: NetworkSpec, rank: int, alpha: float, targets: list[str]) -> dict[str, str]:
    """`ss_network_args` as the peers write them: strings, `algo` and `conv_dim`/`conv_alpha` for LyCORIS."""
    args: dict[str, str] = {}
    if spec.kind not in ("lora", "locon"):
        args["algo"] = "lora" if spec.kind == "dora" else spec.kind
    if spec.adapts_convs:
        conv_rank, conv_alpha = conv_rank_alpha(spec, rank, alpha)
        args["conv_dim"] = str(conv_rank)
        args["conv_alpha"] = _num(conv_alpha)
    if spec.kind == "lokr":
        args["factor"] = str(spec.factor)
        if spec.decompose_both:
            args["decompose_both"] = "True"
    if spec.use_tucker:
        args["use_tucker"] = "True"
    if spec.kind == "dora":
        args["dora_wd"] = "True"
    args["target_modules"] = ",".join(targets)
    return args


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


# --- sizes (the planner) ----------------------------------------------------------------------------------


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's (and PEFT LoKr's) split of a dimension into two factors (smaller first)."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


def adapter_numels(
    spec: NetworkSpec, d_in: int, d_out: int, kernel: int, rank: int, *, conv3x3: bool
) -> list[int]:
    """Element counts of one adapted layer's trainable tensors (as PEFT creates them)."""
    if conv3x3:
        rank = conv_rank_alpha(spec, rank, 1.0)[0]
    if spec.kind in ("lora", "locon", "dora"):
        sizes = [rank * d_in * kernel, d_out * rank]
        return sizes + ([d_out] if spec.kind == "dora" else [])
    if spec.kind == "loha":
        if conv3x3 and spec.use_tucker:
            k = kernel
            return [rank * rank * k, rank * d_out, rank * d_in] * 2
        return [d_out * rank, rank * d_in * kernel] * 2
    out_l, out_k = factorization(d_out, spec.factor)
    in_m, in_n = factorization(d_in, spec.factor)
    sizes = []
    w1_full = not spec.decompose_both or rank >= max(out_l, in_m) / 2
    sizes += [out_l * in_m] if w1_full else [out_l * rank, rank * in_m]
    w2_full = rank >= max(out_k, in_n) / 2
    if w2_full:
        sizes.append(out_k * in_n * kernel)
    elif conv3x3 and spec.use_tucker:
        sizes += [rank * rank * kernel, rank * out_k, rank * in_n]
    else:
        sizes += [out_k * rank, rank * in_n * kernel]
    return sizes


def transient_numel(spec: NetworkSpec, d_in: int, d_out: int, kernel: int) -> int:
    """Elements of the full-size weight a layer's forward materialises and keeps for backward (0 for LoRA)."""
    return 0 if spec.kind in ("lora", "locon") else d_in * d_out * kernel
