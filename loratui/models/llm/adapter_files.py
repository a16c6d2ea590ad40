"""PEFT adapter folders for LLM LoRAs.

An adapter folder holds `adapter_config.json` (asdict(LoraConfig) with `base_model_name_or_path`),
`adapter_model.safetensors` (only `...lora_A.weight` / `...lora_B.weight` tensors, which is what llama.cpp's
`convert_lora_to_gguf.py` accepts), `chat_template.jinja` (the template used in training), `README.md` and
`loratui_adapter.json` (which run and step wrote it). It loads with `PeftModel.from_pretrained`, vLLM and TGI.

An existing adapter folder written by another run is never replaced unless `overwrite`; a folder that holds
anything else is never replaced.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.util.atomic import atomic_directory
from loratui.util.disk import no_space_guard, tensor_bytes

ADAPTER_CONFIG = "adapter_config.json"


ADAPTER_WEIGHTS = "adapter_model.safetensors"


TEMPLATE_FILE = "chat_template.jinja"


MARKER_FILE = "loratui_adapter.json"


DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "fp16": "float16",
    "float16": "float16",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
}


class ExportError(RuntimeError):
    """An export that cannot be done; the message says why."""


class OutputConflict(ExportError):
    """The output folder holds something this export must not replace."""


def adapter_config_dict(peft_config: Any, base_model: str) -> dict[str, Any]:
    """`asdict(LoraConfig)` as PEFT writes it (sets as sorted lists), with the base model reference."""
    data = peft_config.to_dict()
    for key, value in list(data.items()):
        if isinstance(value, set):
            data[key] = sorted(value)
    data["base_model_name_or_path"] = base_model
    alpha = data.get("lora_alpha")
    if isinstance(alpha, float) and alpha.is_integer():
        data["lora_alpha"] = int(alpha)
    return json.loads(json.dumps(data, default=str))


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((Path(folder) / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_output(out: Path, *, run_name: str | None, overwrite: bool, same_run_ok: bool = True) -> None:
    """Raise `OutputConflict` when writing an adapter to `out` would replace something it must not: any other
    run's adapter (or, with `same_run_ok=False`, any adapter) unless `overwrite`, and never a non-adapter folder."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputConflict(f"{out} exists and is not a folder; choose another output_dir")
    if not any(out.iterdir()):
        return
    if not (out / ADAPTER_CONFIG).is_file():
        raise OutputConflict(
            f"{out} is not empty and is not an adapter folder; refusing to replace it. Choose another output_dir"
        )
    marker = read_marker(out)
    same_run = marker is not None and run_name is not None and marker.get("run") == run_name
    if overwrite or (same_run and same_run_ok):
        return
    owner = f"run {marker.get('run')}" if marker and marker.get("run") else "an earlier export"
    raise OutputConflict(
        f"{out} already holds an adapter from {owner}; set another output_dir, or pass --overwrite to replace it"
    )


def usage_snippet(adapter: Path, base_model: str) -> str:
    """A one-line Python snippet that loads the adapter."""
    return (
        "from peft import PeftModel; from transformers import AutoModelForCausalLM; "
        f"model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base_model!r}), {str(adapter)!r})"
    )


def _readme(
    adapter: Path,
    config: dict[str, Any],
    run_name: str | None,
    step: int | None,
    training: dict[str, Any] | None = None,
) -> str:
    base = config.get("base_model_name_or_path", "BASE_MODEL")
    modules = config.get("target_modules")
    settings = ", ".join(f"{k} {v}" for k, v in (training or {}).items())
    trained = f"\n- training settings really used: {settings}" if settings else ""
    return f"""# LoRA adapter

Trained with loratui{f" (run {run_name}, step {step})" if run_name else ""}.

- base model: `{base}`
- rank {config.get("r")}, alpha {config.get("lora_alpha")}, rsLoRA {config.get("use_rslora")}, target modules `{modules}`
- chat template: `{TEMPLATE_FILE}` (the one used in training; use it for inference too){trained}

## Load it

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

base = AutoModelForCausalLM.from_pretrained("{base}")
tokenizer = AutoTokenizer.from_pretrained("{base}")
tokenizer.chat_template = open("{adapter / TEMPLATE_FILE}").read()
model = PeftModel.from_pretrained(base, "{adapter}")
```

Try it: `loratui sample --base {base} --lora {adapter} --prompt "..." --compare`

Merge it into a full model: `loratui export {adapter} --merge --dtype bf16`

llama.cpp / Ollama: `loratui export {adapter} --format gguf` (a GGUF LoRA for `llama-cli --lora`), or
`loratui export {adapter} --merge --format gguf --quant q8_0` (a merged model GGUF and an Ollama `Modelfile`)
"""


def write_adapter(
    out: Path,
    *,
    tensors: dict[str, Any],
    adapter_config: dict[str, Any],
    chat_template: str | None,
    run_name: str | None = None,
    step: int | None = None,
    overwrite: bool = False,
    dtype: str | None = None,
    same_run_ok: bool = True,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write an adapter folder atomically (after `check_output`). Tensor names must be PEFT names without
    the adapter name (`base_model.model.<module>.lora_A.weight`). `training`: the settings the run really
    used (after any out-of-memory recovery), written into README.md and loratui_adapter.json."""
    import torch
    from safetensors.torch import save_file

    out = Path(out)
    check_output(out, run_name=run_name, overwrite=overwrite, same_run_ok=same_run_ok)
    target_dtype = getattr(torch, DTYPES[dtype]) if dtype else None
    clean = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        clean[name] = tensor.to(target_dtype) if target_dtype is not None else tensor
    with (
        no_space_guard(out, what="the adapter", needed=tensor_bytes(clean)),
        atomic_directory(out, replace=True) as tmp,
    ):
        save_file(clean, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(
            json.dumps(adapter_config, indent=2, sort_keys=True), encoding="utf-8"
        )
        if chat_template:
            (tmp / TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        (tmp / "README.md").write_text(
            _readme(out.resolve(), adapter_config, run_name, step, training), encoding="utf-8"
        )
        marker = {"run": run_name, "step": step, "base_model": adapter_config.get("base_model_name_or_path")}
        if training:
            marker["training"] = training
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    return out


def lora_tensors(model: Any) -> dict[str, Any]:
    """The trainable LoRA tensors of a PeftModel under PEFT's saved names (no embeddings, no adapter name)."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, save_embedding_layers=False)


def save_trained_adapter(
    model: Any,
    out: Path,
    *,
    base_model: str,
    chat_template: str | None,
    run_name: str | None,
    step: int | None,
    overwrite: bool,
    training: dict[str, Any] | None = None,
    tensors: dict[str, Any] | None = None,
) -> Path:
    """Write the adapter of a PeftModel being trained (`training`: the settings really used; `tensors`: its
    LoRA tensors when they were gathered elsewhere, e.g. from FSDP shards)."""
    config = adapter_config_dict(model.peft_config["default"], base_model)
    return write_adapter(
        out,
        tensors=tensors if tensors is not None else lora_tensors(model),
        adapter_config=config,
        chat_template=chat_template,
        run_name=run_name,
        step=step,
        overwrite=overwrite,
        training=training,
    )
