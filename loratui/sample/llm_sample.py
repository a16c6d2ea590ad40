"""Try an LLM LoRA: generate with the chat template used in training, optionally base vs adapter side by side.

`loratui sample --base MODEL --lora ADAPTER[:WEIGHT] --prompt "..." [--compare]`. Several `--lora` adapters are
active together; a weight scales an adapter's update (its lora_B). The prompt is one user turn rendered with the
first adapter's `chat_template.jinja` (else the tokenizer's template, else the plain template), exactly as the
trainer rendered its data. `--temperature 0` (default) is greedy decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.models.llm.generate import generate_answer
from loratui.util import jsonsafe

TEMPLATE_FILE = "chat_template.jinja"


@dataclass(frozen=True)
class LoraSpec:
    """One `--lora PATH[:WEIGHT]`."""

    path: Path
    weight: float = 1.0


def parse_lora(spec: str, lora_dir: Path | None = None) -> LoraSpec:
    """`PATH` or `PATH:WEIGHT`; a bare name is looked up in `lora_dir`."""
    path, weight = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            path = spec
    candidate = Path(path).expanduser()
    if not candidate.exists() and lora_dir is not None and (Path(lora_dir) / path).exists():
        candidate = Path(lora_dir) / path
    return LoraSpec(candidate, weight)


def adapter_template(adapter: Path) -> str | None:
    """The chat template saved with an adapter, if any."""
    path = Path(adapter) / TEMPLATE_FILE
    return path.read_text(encoding="utf-8") if path.is_file() else None


class AdapterMismatch(ValueError):
    """An adapter made for another base model (architecture or shapes); the message says which."""


def _model_type_of(reference: str) -> str | None:
    """model_type of a base model reference (local folder or a repo id in the local HF cache), else None."""
    from loratui.data.model_paths import resolve_local_model

    folder = resolve_local_model(reference) if reference else None
    try:
        config = jsonsafe.loads((folder / "config.json").read_text(encoding="utf-8")) if folder else None
    except (OSError, ValueError):
        return None
    return str(config.get("model_type")) if isinstance(config, dict) and config.get("model_type") else None


def check_adapter_fits(adapter: Path, model: Any, base: str) -> list[str]:
    """Refuse an adapter trained on another architecture (`base_model_name_or_path` in adapter_config.json)
    or whose tensors do not fit the base's layers; returns notes to show (a different but compatible base)."""
    from loratui.config.base_model import read_safetensors_header

    try:
        config = jsonsafe.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterMismatch(f"{adapter / 'adapter_config.json'} cannot be read: {str(exc)[:200]}") from exc
    recorded = str(config.get("base_model_name_or_path") or "") if isinstance(config, dict) else ""
    base_type = getattr(getattr(model, "config", None), "model_type", None)
    recorded_type = _model_type_of(recorded)
    if recorded_type and base_type and recorded_type != base_type:
        raise AdapterMismatch(
            f"{adapter} was trained on a {recorded_type} model ({recorded}); the base {base} is {base_type}: "
            f"use --base {recorded} (or an adapter trained on this base)"
        )
    weights = adapter / "adapter_model.safetensors"
    try:
        header = read_safetensors_header(weights) if weights.is_file() else {}
    except (OSError, ValueError) as exc:
        raise AdapterMismatch(f"{weights} cannot be read: {exc}") from exc
    checked = 0
    for key, info in header.items():
        part = ".lora_A." if ".lora_A." in key else ".lora_B." if ".lora_B." in key else None
        if part is None or not isinstance(info, dict):
            continue
        # nested PEFT wrappers (several fused MoE expert weights of one module) save `...experts.base_layer.lora_A`
        path = key.split(part)[0].removeprefix("base_model.model.").replace(".base_layer", "")
        try:
            layer = model.get_submodule(path)
        except AttributeError:
            raise AdapterMismatch(
                f"{adapter} has weights for {path}, which the base {base} does not have; it was trained on "
                f"{recorded or 'another model'}"
            ) from None
        shape = list(info.get("shape") or [])
        want = (
            getattr(layer, "in_features", None)
            if part == ".lora_A."
            else getattr(layer, "out_features", None)
        )
        got = shape[1] if part == ".lora_A." and len(shape) == 2 else shape[0] if shape else None
        if want is not None and got is not None and want != got:
            side = "input" if part == ".lora_A." else "output"
            raise AdapterMismatch(
                f"{adapter} does not fit the base {base}: {path} has {side} size {want} in the base, {got} in the "
                f"adapter (trained on {recorded or 'another model'})"
            )
        checked += 1
    notes = []
    same = recorded and (
        recorded == base
        or Path(recorded).name == Path(base).name
        or Path(recorded).expanduser().resolve() == Path(base).expanduser().resolve()
    )
    if recorded and not same:
        kind = f"both {base_type}" if recorded_type else "its architecture could not be checked"
        notes.append(f"{adapter.name} was trained on {recorded}, not {base} ({kind}; {checked} tensors fit)")
    return notes


def load_with_adapters(
    base: str,
    loras: list[LoraSpec],
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    notes: list[str] | None = None,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, chat template): the base with every adapter loaded and active at its weight.

    Raises `AdapterMismatch` for an adapter made for another base model; what is worth saying about a
    compatible one (trained on another base) is appended to `notes`."""
    from loratui.models.llm.chat import choose_template
    from loratui.models.llm.loading import load_base

    model, tokenizer, _ = load_base(base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    template = next((t for t in (adapter_template(s.path) for s in loras) if t), None)
    template, _ = choose_template(tokenizer, template)
    if not loras:
        return model.eval(), tokenizer, template
    from peft import PeftModel

    names: list[str] = []
    notes = [] if notes is None else notes
    for i, spec in enumerate(loras):
        if not (spec.path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{spec.path} is not a PEFT adapter folder (no adapter_config.json)")
        notes += check_adapter_fits(spec.path, model, base)
        name = f"lora{i}"
        if i == 0:
            model = PeftModel.from_pretrained(model, str(spec.path), adapter_name=name)
        else:
            model.load_adapter(str(spec.path), adapter_name=name)
        if spec.weight != 1.0:
            _scale_adapter(model, name, spec.weight)
        names.append(name)
    model.base_model.set_adapter(names if len(names) > 1 else names[0])
    return model.eval(), tokenizer, template


def _scale_adapter(model: Any, name: str, weight: float) -> None:
    import torch

    with torch.no_grad():
        for module in model.modules():
            lora_b = getattr(module, "lora_B", None)
            if isinstance(lora_b, torch.nn.ModuleDict) and name in lora_b:
                lora_b[name].weight.mul_(weight)


@dataclass(frozen=True)
class TextSample:
    """The answer with the adapters, and (with `compare`) the base model's answer to the same prompt."""

    prompt: str
    answer: str
    base_answer: str | None = None
    notes: tuple[str, ...] = ()  # e.g. an adapter trained on another (compatible) base model


def sample_text(
    *,
    base: str,
    lora: list[str] | None = None,
    lora_dir: Path | None = None,
    prompt: str,
    compare: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 1,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> TextSample:
    """`loratui sample` for LLMs: generate with the adapters (and without them when comparing).

    Raises `ModelLoadError`, `FileNotFoundError` (not an adapter folder) or `ValueError` when loading fails.
    """
    specs = [parse_lora(item, lora_dir) for item in lora or []]
    notes: list[str] = []
    model, tokenizer, template = load_with_adapters(
        base, specs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code, notes=notes
    )
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    answer = generate_answer(model, tokenizer, template, prompt, **options)
    if not (compare and specs):
        return TextSample(prompt, answer, notes=tuple(notes))
    with model.disable_adapter():
        base_answer = generate_answer(model, tokenizer, template, prompt, **options)
    return TextSample(prompt, answer, base_answer, tuple(notes))
