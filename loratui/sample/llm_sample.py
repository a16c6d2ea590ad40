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


def load_with_adapters(
    base: str, loras: list[LoraSpec], *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> tuple[Any, Any, str]:
    """(model, tokenizer, chat template): the base with every adapter loaded and active at its weight."""
    from loratui.models.llm.chat import choose_template
    from loratui.models.llm.loading import load_base

    model, tokenizer, _ = load_base(base, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    template = next((t for t in (adapter_template(s.path) for s in loras) if t), None)
    template, _ = choose_template(tokenizer, template)
    if not loras:
        return model.eval(), tokenizer, template
    from peft import PeftModel

    names = []
    for i, spec in enumerate(loras):
        if not (spec.path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{spec.path} is not a PEFT adapter folder (no adapter_config.json)")
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
    model, tokenizer, template = load_with_adapters(
        base, specs, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code
    )
    options = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed}
    answer = generate_answer(model, tokenizer, template, prompt, **options)
    if not (compare and specs):
        return TextSample(prompt, answer)
    with model.disable_adapter():
        base_answer = generate_answer(model, tokenizer, template, prompt, **options)
    return TextSample(prompt, answer, base_answer)
