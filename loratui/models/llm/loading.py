"""Load a causal LM and its tokenizer offline: an HF folder, a cached hub id, or a GGUF file.

Nothing is ever downloaded (`local_files_only=True`). Every refusal is a `ModelLoadError` whose message says
what is wrong and what to do:

- legacy GGML files (`*.ggmlv3.*.bin`) cannot be trained: use the HF weights or a GGUF conversion;
- a hub id that is not in the local HF cache: the exact command to fetch it on a machine with internet;
- GGUF without the optional `gguf` package; pickle `.bin` weights without `allow_pickle`;
- model code shipped with the folder (`auto_map`) without `trust_remote_code`;
- a folder without tokenizer files; QLoRA (`load_in_4bit`) without bitsandbytes (or, on the CPU, with a
  bitsandbytes older than 0.50, the first that runs NF4 layers there).

QLoRA loads the decoder's linear layers as NF4 (double quantisation); every other weight (embeddings, norms,
`lm_head`) stays in the compute dtype (bf16/fp16, or fp32 without mixed precision), not upcast to fp32.

Tokenizers without a pad token get `pad_token = eos_token` (no new token, so the embeddings are never resized;
padding is always masked out of attention and loss, so the choice of id does not matter for training).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GGML_MESSAGE = (
    "{path} is a legacy GGML file; GGML v3 files cannot be trained. Use the Hugging Face weights "
    "(a folder with config.json + *.safetensors + tokenizer files) or convert the model to GGUF, "
    "and point base_model at that."
)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


class ModelLoadError(RuntimeError):
    """A base model or tokenizer that cannot be loaded; the message says why and how to fix it."""


@dataclass(frozen=True)
class BaseSource:
    """Where a base model comes from, resolved to local files.

    `folder` holds config/weights/tokenizer (a cached hub id resolves to its snapshot folder); for GGUF,
    `folder` is the file's parent and `gguf_file` its name.
    """

    spec: str
    kind: str  # hf-folder | hub-id | gguf
    folder: Path
    gguf_file: str | None = None

    @property
    def load_args(self) -> dict[str, Any]:
        """Arguments shared by the model and tokenizer `from_pretrained` calls."""
        args: dict[str, Any] = {"local_files_only": True}
        if self.gguf_file:
            args["gguf_file"] = self.gguf_file
        return args

    @property
    def display(self) -> str:
        return self.spec if self.kind == "hub-id" else str(self.folder / (self.gguf_file or ""))


def fetch_command(repo_id: str) -> str:
    """The command that downloads a hub model into a folder, to run on a machine with internet."""
    name = repo_id.split("/")[-1]
    return f"hf download {repo_id} --local-dir ./models/{name}"


def _hub_snapshot(repo_id: str, cache_dir: str | os.PathLike | None) -> Path | None:
    """The cached snapshot folder of `repo_id` (with config.json), or None."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "config.json", cache_dir=cache_dir)
    return Path(found).parent if isinstance(found, str) else None


def _missing_from_cache(repo_id: str, cache_dir: str | os.PathLike | None) -> ModelLoadError:
    from huggingface_hub import constants

    cache = cache_dir or constants.HF_HUB_CACHE
    name = repo_id.split("/")[-1]
    return ModelLoadError(
        f"{repo_id} is not in the local Hugging Face cache ({cache}) and nothing is downloaded here.\n"
        f"On a machine with internet run:\n  {fetch_command(repo_id)}\n"
        f"then copy ./models/{name} to this machine and set base_model: ./models/{name} "
        "(or set HF_HOME to a cache that already holds it)."
    )


def resolve_base(spec: str, *, cache_dir: str | os.PathLike | None = None) -> BaseSource:
    """Turn `base_model` into local files, or raise `ModelLoadError` with the fix."""
    from loratui.config.base_model import inspect_base_model

    info = inspect_base_model(spec)
    if info.kind == "ggml":
        raise ModelLoadError(GGML_MESSAGE.format(path=spec))
    if info.kind == "gguf":
        path = Path(spec).expanduser().resolve()
        return BaseSource(spec, "gguf", path.parent, path.name)
    if info.kind == "hf-folder":
        return BaseSource(spec, "hf-folder", Path(spec).expanduser().resolve())
    if info.kind == "hub-id":
        snapshot = _hub_snapshot(spec, cache_dir)
        if snapshot is None:
            raise _missing_from_cache(spec, cache_dir)
        return BaseSource(spec, "hub-id", snapshot)
    if info.kind == "missing":
        raise ModelLoadError(f"base model not found: {spec} ({Path(spec).expanduser().resolve()})")
    if info.kind == "pickle":
        raise ModelLoadError(
            f"{spec} is a single pickle file; an LLM base model must be a Hugging Face folder "
            "(config.json + weights + tokenizer) or a GGUF file"
        )
    raise ModelLoadError(
        f"{spec} is not a causal language model loratui can read ({info.kind}); use a Hugging Face folder "
        "(config.json + *.safetensors + tokenizer), a model id in the local HF cache, or a GGUF file"
    )


def _weight_files(folder: Path) -> tuple[list[Path], list[Path]]:
    safe = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.glob("*.bin") if "training_args" not in p.name)
    return safe, pickles


def _check_weights(source: BaseSource, allow_pickle: bool) -> bool:
    """True when the weights must be read from pickle files (only with `allow_pickle`)."""
    if source.gguf_file:
        return False
    safe, pickles = _weight_files(source.folder)
    if safe:
        return False
    if pickles:
        if not allow_pickle:
            names = ", ".join(p.name for p in pickles[:3])
            raise ModelLoadError(
                f"{source.display} has only pickle weights ({names}); loading a pickle runs code from the file. "
                "Convert them to safetensors, or allow it with allow_pickle: true / --allow-pickle "
                "if you trust the source."
            )
        return True
    raise ModelLoadError(f"no weight files (*.safetensors) in {source.folder}")


def _check_remote_code(source: BaseSource, trust_remote_code: bool) -> None:
    if source.gguf_file or trust_remote_code:
        return
    try:
        config = json.loads((source.folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not config.get("auto_map"):
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return  # transformers has its own implementation; the shipped code is not needed
    raise ModelLoadError(
        f"{source.display} ships its own model code (auto_map in config.json) and transformers has no built-in "
        f"implementation of model_type {config.get('model_type')!r}. It runs only with trust_remote_code: true "
        "(or --trust-remote-code); read the code first."
    )


def _check_gguf() -> None:
    from transformers.utils import is_gguf_available

    if not is_gguf_available():
        raise ModelLoadError(
            "reading a GGUF file needs the optional gguf package: pip install 'loratui[gguf]' "
            "(transformers dequantises the file to 16/32-bit weights for training)"
        )


def _has_tokenizer_files(source: BaseSource) -> bool:
    return bool(source.gguf_file) or any((source.folder / name).exists() for name in TOKENIZER_FILES)


def ensure_pad_token(tokenizer: Any) -> str:
    """Give a tokenizer without pad token one; returns a note for the run log ("" when nothing changed).

    The eos token is reused (no embedding resize); padded positions are masked out of attention and loss.
    """
    if tokenizer.pad_token_id is not None:
        return ""
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
        return (
            f"the tokenizer has no pad token; padding with the eos token {tokenizer.eos_token!r} (masked out)"
        )
    if tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
        return f"the tokenizer has no pad or eos token; padding with {tokenizer.unk_token!r} (masked out)"
    raise ModelLoadError("the tokenizer has no pad, eos or unk token to pad with")


def load_tokenizer(source: BaseSource, *, trust_remote_code: bool = False) -> Any:
    """The base model's tokenizer (pad token ensured, right padding)."""
    if not _has_tokenizer_files(source):
        raise ModelLoadError(
            f"no tokenizer in {source.folder} (expected one of {', '.join(TOKENIZER_FILES[:3])}); copy the "
            "tokenizer files from the original model repository into this folder"
        )
    _check_remote_code(source, trust_remote_code)
    if source.gguf_file:
        _check_gguf()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source.folder), trust_remote_code=trust_remote_code, **source.load_args
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the tokenizer from {source.display}: {exc}") from exc
    ensure_pad_token(tokenizer)
    tokenizer.padding_side = "right"
    return tokenizer


def qlora_compute_dtype(dtype: Any) -> Any:
    """The dtype 4-bit layers compute in: the dtype of the other weights (bf16/fp16 under mixed precision, fp32
    with `mixed_precision: no`), so nothing is cast back and forth between layers."""
    import torch

    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32


def quantization_config(compute_dtype: Any, device_type: str | None = None, quant_storage: Any = None) -> Any:
    """NF4 + double quantisation (QLoRA). Raises `ModelLoadError` when bitsandbytes cannot run it here.
    `quant_storage`: the dtype the packed 4-bit values are stored in (bf16 for FSDP, which shards floats)."""
    import torch

    from loratui.models.quant import bitsandbytes_problem, quiet_cpu_kernel_notice

    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    problem = bitsandbytes_problem(device_type, "load_in_4bit (QLoRA)")
    if problem:
        raise ModelLoadError(f"{problem} (or set load_in_4bit: false)")
    quiet_cpu_kernel_notice()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
    )


def load_causal_lm(
    source: BaseSource,
    *,
    dtype: Any = None,
    load_in_4bit: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    shard: bool = False,
) -> Any:
    """Load the model (on the CPU; 4-bit: on the current CUDA device, or the CPU without one). Raises
    `ModelLoadError`.
    `shard` (FSDP): 4-bit weights are packed in the compute dtype and stay on the CPU until sharded."""
    import torch

    dtype = dtype or torch.float32
    pickle = _check_weights(source, allow_pickle)
    _check_remote_code(source, trust_remote_code)
    if source.gguf_file:
        _check_gguf()
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "use_safetensors": None if pickle else (None if source.gguf_file else True),
        **source.load_args,
    }
    if load_in_4bit:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        compute = qlora_compute_dtype(dtype)
        storage = compute if shard else None  # FSDP shards floats: the packed 4-bit values stored as such
        kwargs["quantization_config"] = quantization_config(compute, device_type, storage)
        on_gpu = device_type == "cuda" and not shard
        kwargs["device_map"] = {"": torch.cuda.current_device() if on_gpu else "cpu"}
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(source.folder), **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise ModelLoadError(
                f"{source.display} needs its own model code; allow it with trust_remote_code: true "
                "(or --trust-remote-code) after reading it"
            ) from exc
        raise ModelLoadError(
            f"cannot load the model from {source.display}: {type(exc).__name__}: {text}"
        ) from exc


def load_base(
    spec: str,
    *,
    dtype: Any = None,
    load_in_4bit: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
    shard: bool = False,
) -> tuple[Any, Any, BaseSource]:
    """(model, tokenizer, source) for `base_model`; the tokenizer is checked first (it is cheaper)."""
    source = resolve_base(spec, cache_dir=cache_dir)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code)
    model = load_causal_lm(
        source,
        dtype=dtype,
        load_in_4bit=load_in_4bit,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        shard=shard,
    )
    return model, tokenizer, source


def base_model_reference(source: BaseSource) -> str:
    """What adapters record as `base_model_name_or_path`: the hub id, or the absolute local path."""
    if source.kind == "hub-id":
        return source.spec
    return str(source.folder / source.gguf_file) if source.gguf_file else str(source.folder)
