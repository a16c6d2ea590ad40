"""`loratui export --format gguf`: LLM LoRAs for llama.cpp and Ollama, written with the `gguf` package.

- Adapter (`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`): one `lora_a` / `lora_b` pair
  per adapted weight, named after the base tensor (`blk.0.attn_q.weight.lora_a`). The tensors keep PEFT's
  orientation: A is (rank, in), B is (out, rank); in GGUF's dimension order A is [in, rank] and B [rank, out],
  which is what llama.cpp checks against the base tensor [in, out]. llama.cpp scales by `alpha / rank` (the rank
  of each tensor), like PEFT; rsLoRA (`alpha / sqrt(rank)`) and per-module alpha/rank patterns are folded into
  B so that every module gets PEFT's scale. For the `llama` architecture the rows of B of q/k are permuted
  like the base weights (see `gguf_layout`). Loads with `llama-cli -m BASE.gguf --lora adapter.gguf`.
- Merged model: base + LoRA merged by PEFT, every tensor renamed/reordered as llama.cpp expects, f32/f16/bf16
  or q8_0 (`gguf.quants`; 1-D tensors stay f32, rows that do not split into 32-value blocks fall back to f16),
  the tokenizer and chat template (`gguf_vocab`), and an Ollama `Modelfile` next to it (`ollama`).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from loratui.export.gguf_layout import (
    Layout,
    UnsupportedArchitecture,
    add_hparams,
    extra_tensors,
    layout_for,
)
from loratui.export.gguf_layout import text_config as layout_config
from loratui.export.llm_source import ExportSource
from loratui.export.result import Exported, UnusableExportRequest
from loratui.models.llm.adapter_files import ExportError, OutputConflict

QUANTS = ("f32", "f16", "bf16", "q8_0")
_ALIASES = {
    "fp32": "f32",
    "float32": "f32",
    "fp16": "f16",
    "float16": "f16",
    "bfloat16": "bf16",
    "q8": "q8_0",
}
MODEL_FILE = "model.gguf"
MODELFILE = "Modelfile"
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def parse_quant(value: str | None, default: str) -> str:
    """f32 | f16 | bf16 | q8_0 (fp16/bf16/fp32 accepted as in --dtype)."""
    if value is None:
        return default
    quant = _ALIASES.get(value.lower(), value.lower())
    if quant not in QUANTS:
        raise UnusableExportRequest(f"--quant must be one of {', '.join(QUANTS)} for GGUF, not {value!r}")
    return quant


def _qtype(quant: str) -> Any:
    import gguf

    return {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[quant]


def _file_type(quant: str) -> int:
    import gguf

    return int(
        {
            "f32": gguf.LlamaFileType.ALL_F32,
            "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        }[quant]
    )


def tensor_quant(array: np.ndarray, quant: str) -> str:
    """The type one tensor is stored as: 1-D tensors f32; q8_0 needs rows of whole 32-value blocks, else f16."""
    import gguf

    if array.ndim <= 1:
        return "f32"
    block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
    if quant == "q8_0" and array.shape[-1] % block:
        return "f16"
    return quant


def add_tensor(writer: Any, name: str, array: np.ndarray, quant: str) -> None:
    """Add `array` (float) to `writer` as `quant` (see `tensor_quant`)."""
    import gguf

    kind = tensor_quant(array, quant)
    data = gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), _qtype(kind))
    if kind in ("f32", "f16"):
        writer.add_tensor(name, data)
    else:
        writer.add_tensor(name, data, raw_dtype=_qtype(kind))


def _write(writer: Any, target: Path) -> None:
    """Write the writer's file to `target` through a temporary name (no half-written file at `target`)."""
    tmp = target.with_name(f".{target.name}.partial")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _refuse_existing(paths: list[Path], overwrite: bool) -> None:
    for path in paths:
        if path.is_dir():
            raise OutputConflict(f"{path} is a folder; give a .gguf file name or another --out")
        if path.exists() and not overwrite:
            raise OutputConflict(f"{path} exists; pass --overwrite to replace it or choose another --out")


# --- adapters ---------------------------------------------------------------------------------------------


def base_config(src: ExportSource) -> Any:
    """The transformers config of the adapter's base model (read from its folder or GGUF file)."""
    from transformers import AutoConfig

    from loratui.models.llm.loading import resolve_base

    if not src.base_model:
        raise ExportError(
            "the adapter does not name its base model (base_model_name_or_path); GGUF needs its architecture"
        )
    base = resolve_base(src.base_model)
    return AutoConfig.from_pretrained(
        str(base.folder), **base.load_args, trust_remote_code=src.trust_remote_code
    )


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: a key matches a module name or its dotted suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def peft_scale(adapter_config: dict[str, Any], module: str, rank: int) -> float:
    """The factor PEFT multiplies B @ A by for `module`."""
    alpha = float(
        _pattern_value(adapter_config.get("alpha_pattern"), module, adapter_config.get("lora_alpha", 8))
    )
    return alpha / (math.sqrt(rank) if adapter_config.get("use_rslora") else rank)


def _lora_pairs(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    pairs: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        match = LORA_KEY.match(key)
        if not match:
            raise ExportError(
                f"{key} cannot go into a GGUF LoRA adapter: llama.cpp adapters hold only LoRA A/B matrices "
                "(not DoRA magnitudes, LoRA biases, embedding LoRAs or fully trained modules_to_save)"
            )
        pairs.setdefault(match["module"], {})[match["part"]] = tensor
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise ExportError(f"{module} has lora_{next(iter(pair))} without its other half")
    return pairs


def gguf_adapter_tensors(
    tensors: dict[str, Any], adapter_config: dict[str, Any], layout: Layout
) -> tuple[dict[str, np.ndarray], float]:
    """({GGUF tensor name: array}, adapter alpha) for PEFT adapter tensors."""
    pairs = _lora_pairs(tensors)
    if not pairs:
        raise ExportError("the adapter holds no LoRA tensors")
    rank = int(adapter_config.get("r") or next(iter(pairs.values()))["A"].shape[0])
    alpha = (
        peft_scale(adapter_config, "", rank) * rank
        if not adapter_config.get("alpha_pattern")
        else float(rank)
    )
    out: dict[str, np.ndarray] = {}
    for module in sorted(pairs):
        name = layout.gguf_name(module)
        if ".experts" in module or (name and ("_exps" in name or "_shexp" in name)):
            raise UnsupportedArchitecture(
                f"{module}: LoRA on mixture-of-experts expert layers cannot be exported to GGUF yet; export "
                "--format peft, or train with target_modules on the attention layers"
            )
        if name is None:
            raise ExportError(
                f"llama.cpp's {layout.arch} model has no tensor for {module}; remove it from target_modules"
            )
        a = pairs[module]["A"].float().numpy()
        b = pairs[module]["B"].float().numpy()
        module_rank = a.shape[0]
        factor = peft_scale(adapter_config, module, module_rank) * module_rank / alpha
        if not math.isclose(factor, 1.0, rel_tol=1e-7):
            b = b * factor
        heads = layout.row_heads(module)
        if heads:
            b = layout.weight_for_gguf(module + ".weight", b)
        out[f"{name}.weight.lora_a"] = a
        out[f"{name}.weight.lora_b"] = b
    return out, alpha


def write_adapter_gguf(src: ExportSource, target: Path, *, quant: str, overwrite: bool) -> Path:
    """The adapter of `src` as a llama.cpp GGUF LoRA file at `target`."""
    import gguf

    _refuse_existing([target], overwrite)
    layout = layout_for(base_config(src))
    arrays, alpha = gguf_adapter_tensors(src.tensors, src.adapter_config, layout)
    writer = gguf.GGUFWriter(None, layout.arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    writer.add_name(f"{src.run_name or src.path.name} LoRA")
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, array in arrays.items():
        add_tensor(writer, name, array, quant)
    _write(writer, target)
    return target


# --- merged models ---------------------------------------------------------------------------------------


def merged_gguf_tensors(model: Any, layout: Layout) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float array) for every weight of a (merged) transformers model, in llama.cpp's layout; one at
    a time, so that only one tensor is held in float32 besides the model and the written data."""
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = model.state_dict()
    names = {}
    for key in state:
        if tied and key == "lm_head.weight":
            continue  # llama.cpp uses token_embd for the output when `output` is absent
        names[key] = layout.gguf_name(key)
        if names[key] is None:
            raise ExportError(f"llama.cpp's {layout.arch} model has no tensor for {key}")
    for key, name in names.items():
        yield name, layout.weight_for_gguf(key, state[key].detach().float().cpu().numpy())
    yield from extra_tensors(layout, config).items()


def merged_targets(out: Path) -> tuple[Path, Path]:
    """(model file, Modelfile) for --out: a `.gguf` file name, or a folder that gets `model.gguf`."""
    model = out if out.suffix == ".gguf" else out / MODEL_FILE
    return model, model.with_name(MODELFILE)


def _dense(layout: Layout) -> Layout:
    if layout.is_moe:
        raise UnsupportedArchitecture(
            f"merged GGUF export of mixture-of-experts models ({layout.arch}) is not supported yet; export the "
            "adapter (--format gguf without --merge) or a merged Hugging Face folder (--merge --format peft)"
        )
    return layout


def write_model_gguf(
    model: Any, base: Any, target: Path, *, quant: str, chat_template: str | None, name: str
) -> Layout:
    """A transformers causal LM as a GGUF model file; the tokenizer is read from `base` (a `BaseSource`)."""
    import gguf

    from loratui.export.gguf_vocab import add_vocab_from_folder, add_vocab_from_gguf

    layout = _dense(layout_for(model.config))
    writer = gguf.GGUFWriter(None, layout.arch)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    add_hparams(writer, layout, model.config)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if base.gguf_file:
        add_vocab_from_gguf(writer, base.folder / base.gguf_file, chat_template=chat_template)
    else:
        vocab_size = int(layout_config(model.config).vocab_size)
        add_vocab_from_folder(
            writer, base.folder, arch=layout.arch, n_vocab=vocab_size, chat_template=chat_template
        )
    for tensor_name, array in merged_gguf_tensors(model, layout):
        add_tensor(writer, tensor_name, array, quant)
    _write(writer, target)
    return layout


def write_merged_gguf(src: ExportSource, out: Path, *, quant: str, overwrite: bool) -> Path:
    """Base + adapter merged into one GGUF model file, with an Ollama Modelfile beside it."""
    from loratui.export.llm_source import merged_model
    from loratui.export.ollama import modelfile_text
    from loratui.util.atomic import atomic_write_text

    model_path, modelfile = merged_targets(Path(out))
    _refuse_existing([model_path, modelfile], overwrite)
    _dense(layout_for(base_config(src)))  # an unsupported family is refused before the model is loaded
    model, tokenizer, base = merged_model(src)
    template = src.chat_template or getattr(tokenizer, "chat_template", None)
    name = f"{Path(src.base_model).name} + {src.run_name or src.path.name}"
    write_model_gguf(model, base, model_path, quant=quant, chat_template=template, name=name)
    atomic_write_text(
        modelfile, modelfile_text(model_path.name, template, getattr(tokenizer, "eos_token", None))
    )
    return model_path


# --- the export ------------------------------------------------------------------------------------------


def default_target(src: ExportSource, *, merge: bool, quant: str) -> Path:
    folder = src.default_out(merge, quant)
    if merge:
        return folder.with_name(folder.name.replace("merged-", "merged-gguf-", 1))
    return folder.with_name(folder.name + ".gguf")


def export_gguf(
    src: ExportSource, *, merge: bool, quant: str | None, out: Path | None, overwrite: bool
) -> Exported:
    """A GGUF adapter (default f32) or, with `merge`, a merged GGUF model (default f16) + Modelfile."""
    chosen = parse_quant(quant, "f16" if merge else "f32")
    target = Path(out) if out else default_target(src, merge=merge, quant=chosen)
    if merge:
        path = write_merged_gguf(src, target, quant=chosen, overwrite=overwrite)
        usage = f"llama-cli -m {path}   |   ollama create NAME -f {path.with_name(MODELFILE)}"
        return Exported(path, "gguf-merged", usage)
    if target.suffix != ".gguf":
        target = target / "adapter.gguf"
    path = write_adapter_gguf(src, target, quant=chosen, overwrite=overwrite)
    return Exported(path, "gguf-adapter", f"llama-cli -m BASE_MODEL.gguf --lora {path}")
