"""Load Stable Diffusion base models offline: diffusers folders and single-file (LDM layout) checkpoints.

Nothing here touches the network. Single-file checkpoints (`v1-5-pruned.safetensors`,
`sd_xl_base_1.0.safetensors`, ...) are built from the architecture configs bundled in
`loratui/models/sd_configs/` and converted with diffusers' single-file conversion functions. The CLIP
tokenizer files are derived from the bundled CLIP BPE merges (`clip_bpe_simple_vocab_16e6.txt.gz`, from
open_clip, MIT licence) exactly as CLIP builds its vocabulary.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from loratui.config.base_model import (
    ModelInfo,
    classify_state_keys,
    inspect_base_model,
    read_safetensors_header,
    schedule_markers,
)
from loratui.models.sd.schedule import configure_pipeline_scheduler

CONFIG_NAMES = ("sd15", "sd2", "sd2-v", "sdxl")
BPE_FILE = "clip_bpe_simple_vocab_16e6.txt.gz"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
#: CLIP keeps the first 49152 - 256 - 2 merges of the BPE file (line 0 is a header).
CLIP_MERGES = 49152 - 256 - 2


class BaseModelError(ValueError):
    """A base model that cannot be used; the message says what the file looks like and what to do."""


@dataclass
class LoadedSD:
    """A loaded pipeline plus what loratui found out about it."""

    pipeline: Any
    family: str  # sd15 | sd2 | sdxl
    prediction_type: str  # epsilon | v_prediction
    source: str
    kind: str  # diffusers-folder | single-file | hub-cache
    notes: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False  # the pipeline's scheduler uses the rescaled (zero terminal SNR) betas

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"


# --- CLIP tokenizer files from the bundled BPE merges -----------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


@lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], tuple[str, ...]]:
    """(vocab, merges) of the real CLIP tokenizer, derived from the bundled BPE file as CLIP does."""
    raw = resources.files("loratui.models.sd_configs").joinpath(BPE_FILE).read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = tuple(lines[1 : CLIP_MERGES + 1])
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer_files(folder: Path) -> None:
    """Write vocab.json and merges.txt (the Hugging Face CLIPTokenizer layout) into `folder`."""
    vocab, merges = clip_bpe_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


# --- bundled architecture configs -------------------------------------------------------------------


def cache_root() -> Path:
    """Where loratui keeps derived files: $LORATUI_CACHE_DIR, else $XDG_CACHE_HOME/loratui, else ~/.cache/loratui."""
    if os.environ.get("LORATUI_CACHE_DIR"):
        return Path(os.environ["LORATUI_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "loratui"


def _bundled_files(name: str) -> dict[str, bytes]:
    """Relative path -> bytes of one bundled config folder."""
    root = resources.files("loratui.models.sd_configs").joinpath(name)
    out: dict[str, bytes] = {}

    def walk(node, prefix: str) -> None:
        for child in node.iterdir():
            rel = f"{prefix}{child.name}"
            if child.is_dir():
                walk(child, rel + "/")
            else:
                out[rel] = child.read_bytes()

    walk(root, "")
    return out


def bundled_config_folder(name: str) -> Path:
    """A complete diffusers config folder (configs + tokenizer files, no weights) for `name`.

    `name` is one of sd15, sd2, sd2-v, sdxl. The folder is written once into the cache and reused.
    """
    if name not in CONFIG_NAMES:
        raise ValueError(f"no bundled config {name!r}; expected one of {', '.join(CONFIG_NAMES)}")
    files = _bundled_files(name)
    digest = hashlib.sha256()
    for rel in sorted(files):
        digest.update(rel.encode() + b"\0" + files[rel])
    digest.update(resources.files("loratui.models.sd_configs").joinpath(BPE_FILE).read_bytes()[:4096])
    target = cache_root() / "sd_configs" / f"{name}-{digest.hexdigest()[:12]}"
    if (target / "model_index.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for rel, data in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        for tokenizer in ("tokenizer", "tokenizer_2"):
            if (tmp / tokenizer).is_dir():
                write_clip_tokenizer_files(tmp / tokenizer)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- what a file is -----------------------------------------------------------------------------------


def check_safetensors_complete(path: Path) -> dict:
    """The header of a complete .safetensors file; BaseModelError when the file is cut short."""
    try:
        header = read_safetensors_header(path)
    except (ValueError, OSError) as exc:
        raise BaseModelError(f"{path} is not a readable .safetensors file ({exc}); re-download it") from exc
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
    needed = (
        8 + length + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    )
    size = path.stat().st_size
    if size < needed:
        raise BaseModelError(
            f"{path} is truncated: {size:,} bytes on disk, {needed:,} expected (an interrupted download?); "
            "download it again"
        )
    return header


def describe_wrong_file(info: ModelInfo) -> str | None:
    """A message for a base-model path that is not a Stable Diffusion model, or None when it is one."""
    path = info.path
    if info.kind in ("diffusers-folder", "sd-checkpoint", "hub-id", "pickle"):
        return None
    if info.kind == "missing":
        return f"base model not found: {path}"
    if info.kind == "lora":
        return (
            f"{path} is a LoRA file, not a base model: use it with `loratui sample --lora` or as `init_lora`, "
            "and point base_model at the checkpoint it was trained on"
        )
    if info.kind == "vae":
        return f"{path} is a VAE (encoder/decoder weights only), not a full Stable Diffusion checkpoint"
    if info.kind in ("llm-weights", "hf-folder", "gguf", "ggml"):
        return f"{path} looks like a language model ({info.kind}); image LoRA training needs a Stable Diffusion model"
    notes = "; ".join(info.notes)
    return f"{path} is not a Stable Diffusion checkpoint{f' ({notes})' if notes else ''}"


# --- loading -------------------------------------------------------------------------------------------


def _sd2_config_name(path: Path, metadata: dict, prediction_type: str, notes: list[str]) -> str:
    """sd2 (epsilon, 512) or sd2-v (v-prediction, 768) for an SD 2.x single file."""
    if prediction_type == "v_prediction":
        return "sd2-v"
    if prediction_type == "epsilon":
        return "sd2"
    arch = str(metadata.get("modelspec.architecture", ""))
    if arch:
        return "sd2-v" if "768-v" in arch or arch.endswith("-v") else "sd2"
    name = path.name.lower()
    if re.search(r"512|base", name):
        return "sd2"
    if not re.search(r"768|[-_]v[-_.]", name):
        notes.append(
            "SD 2.x checkpoint: assuming the 768-v (v-prediction) variant; set prediction_type: epsilon "
            "for 512-base checkpoints"
        )
    return "sd2-v"


def _load_state_dict(path: Path, allow_pickle: bool) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if not allow_pickle:
        raise BaseModelError(
            f"{path} is a pickle checkpoint ({path.suffix}): loading it runs any code stored inside. "
            "Prefer the .safetensors version of this model; if you trust the file, pass --allow-pickle "
            "(config key allow_pickle: true)"
        )
    import torch

    data = torch.load(str(path), map_location="cpu", weights_only=False)  # allowed explicitly by the user
    while isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise BaseModelError(f"{path} does not hold a state dict")
    return {k: v for k, v in data.items() if hasattr(v, "shape")}


def _pipeline_class(family: str):
    import diffusers

    return diffusers.StableDiffusionXLPipeline if family == "sdxl" else diffusers.StableDiffusionPipeline


def _extra_kwargs(family: str) -> dict[str, Any]:
    if family == "sdxl":
        return {}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _build_from_state_dict(state: dict, config_dir: Path, family: str, torch_dtype) -> Any:
    """Build the pipeline components from a single-file (LDM layout) state dict and local configs."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm

    index = json.loads((config_dir / "model_index.json").read_text(encoding="utf-8"))
    common = {"config": str(config_dir), "local_files_only": True, "torch_dtype": torch_dtype}
    components: dict[str, Any] = {
        "unet": diffusers.UNet2DConditionModel.from_single_file(state, subfolder="unet", **common),
        "vae": diffusers.AutoencoderKL.from_single_file(state, subfolder="vae", **common),
    }
    for name in ("text_encoder", "text_encoder_2"):
        if name in index and index[name][0]:
            cls = getattr(transformers, index[name][1])
            components[name] = create_diffusers_clip_model_from_ldm(
                cls,
                state,
                subfolder=name,
                config=str(config_dir),
                torch_dtype=torch_dtype,
                local_files_only=True,
            )
    for name in ("tokenizer", "tokenizer_2"):
        if name in index and index[name][0]:
            components[name] = transformers.CLIPTokenizer.from_pretrained(str(config_dir / name))
    scheduler_cls = getattr(diffusers, index["scheduler"][1])
    components["scheduler"] = scheduler_cls.from_pretrained(str(config_dir), subfolder="scheduler")
    return _pipeline_class(family)(**components, **_extra_kwargs(family))


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence info/warning logs and progress bars of transformers and diffusers while loading."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    saved = [(mod, mod.get_verbosity(), mod.is_progress_bar_enabled()) for mod in (dlog, tlog)]
    for mod, _, _ in saved:
        mod.set_verbosity_error()
        mod.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        for mod, level, bars in saved:
            mod.set_verbosity(level)
            if bars:
                mod.enable_progress_bar()


def _quiet():
    return quiet_libraries()


def load_single_file(
    path: Path,
    *,
    family: str | None = None,
    allow_pickle: bool = False,
    torch_dtype=None,
    prediction_type: str = "auto",
    zero_terminal_snr: bool | None = None,
    config_dir: Path | None = None,
) -> LoadedSD:
    """Load a single-file checkpoint (LDM layout) with bundled configs (or `config_dir`).

    `prediction_type: auto` and `zero_terminal_snr: None` follow the file's `v_pred` / `ztsnr` marker keys."""
    path = Path(path)
    notes: list[str] = []
    metadata: dict = {}
    marked: tuple[str | None, bool] = (None, False)
    if path.suffix.lower() == ".safetensors":
        header = check_safetensors_complete(path)
        metadata = header.get("__metadata__") or {}
        marked = schedule_markers(header)
        kind, detected = classify_state_keys([k for k in header if k != "__metadata__"])
        if kind != "sd-checkpoint":
            message = describe_wrong_file(ModelInfo(str(path), kind, family=detected))
            raise BaseModelError(message or f"{path} is not a Stable Diffusion checkpoint")
        family = detected
    state = _load_state_dict(path, allow_pickle)
    if path.suffix.lower() != ".safetensors":
        marked = schedule_markers(state)
        kind, detected = classify_state_keys(list(state))
        if kind != "sd-checkpoint":
            raise BaseModelError(
                describe_wrong_file(ModelInfo(str(path), kind, family=detected)) or str(path)
            )
        family = detected
    assert family in ("sd15", "sd2", "sdxl")
    if prediction_type == "auto" and marked[0]:  # the `v_pred` marker key
        prediction_type = marked[0]
    if zero_terminal_snr is None and marked[1]:  # the `ztsnr` marker key
        zero_terminal_snr = True
    name = family if family != "sd2" else _sd2_config_name(path, metadata, prediction_type, notes)
    folder = Path(config_dir) if config_dir else bundled_config_folder(name)
    with _quiet():
        pipeline = _build_from_state_dict(state, folder, family, torch_dtype)
    del state
    return _finish(pipeline, family, prediction_type, zero_terminal_snr, str(path), "single-file", notes)


def _finish(
    pipeline, family: str, requested: str, zero_terminal_snr: bool | None, source: str, kind: str, notes
) -> LoadedSD:
    """The LoadedSD with the pipeline's scheduler set to the prediction type and noise schedule in use."""
    prediction = _prediction_type(pipeline, requested)
    ztsnr = (
        bool(pipeline.scheduler.config.get("rescale_betas_zero_snr"))
        if zero_terminal_snr is None
        else (zero_terminal_snr)
    )
    with _quiet():
        configure_pipeline_scheduler(pipeline, prediction, ztsnr)
    return LoadedSD(pipeline, family, prediction, source, kind, list(notes), zero_terminal_snr=ztsnr)


def _prediction_type(pipeline, requested: str) -> str:
    if requested in ("epsilon", "v_prediction"):
        return requested
    return str(pipeline.scheduler.config.get("prediction_type", "epsilon") or "epsilon")


def _family_of_folder(info: ModelInfo) -> str:
    return info.family if info.family in ("sd15", "sd2", "sdxl") else "sd15"


def load_sd_pipeline(
    base_model: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    torch_dtype=None,
    prediction_type: str = "auto",
    zero_terminal_snr: bool | None = None,
    config_dir: Path | None = None,
) -> LoadedSD:
    """Load a base model from a diffusers folder, a single-file checkpoint, or the local HF cache.

    The pipeline's scheduler is set to the prediction type in use (`auto`: the checkpoint's) and, with zero
    terminal SNR (`None`: the checkpoint's marker or scheduler config), to the rescaled schedule with
    trailing timesteps.

    Raises `BaseModelError` with a clear message for missing, wrong or unsafe files.
    """
    info = inspect_base_model(str(base_model))
    message = describe_wrong_file(info)
    if message:
        raise BaseModelError(message)
    path = Path(info.path)
    if info.kind in ("sd-checkpoint", "pickle"):
        return load_single_file(
            path,
            family=info.family,
            allow_pickle=allow_pickle,
            torch_dtype=torch_dtype,
            prediction_type=prediction_type,
            zero_terminal_snr=zero_terminal_snr,
            config_dir=config_dir,
        )
    family = _family_of_folder(info)
    with _quiet():
        cls = _pipeline_class(family)
    source = str(path) if info.kind == "diffusers-folder" else str(base_model)
    try:
        with _quiet():
            pipeline = cls.from_pretrained(
                source,
                local_files_only=True,
                torch_dtype=torch_dtype,
                use_safetensors=not allow_pickle or None,
                trust_remote_code=False,
                **_extra_kwargs(family),
            )
    except OSError as exc:
        if info.kind == "hub-id":
            raise BaseModelError(
                f"{base_model} is not a local path and is not in the local Hugging Face cache; loratui does "
                "not download models: download it first (e.g. `huggingface-cli download`) or point at a folder "
                "or .safetensors file"
            ) from exc
        text = str(exc)
        if "safetensors" in text.lower():
            raise BaseModelError(
                f"{path}: some weights are only available as pickle (.bin) files; pass --allow-pickle if you "
                f"trust them ({text.splitlines()[0]})"
            ) from exc
        raise BaseModelError(f"cannot load {path}: {text.splitlines()[0] if text else exc}") from exc
    if info.kind == "hub-id":
        family = _detect_family_from_pipeline(pipeline)
    kind = "diffusers-folder" if info.kind == "diffusers-folder" else "hub-cache"
    return _finish(pipeline, family, prediction_type, zero_terminal_snr, source, kind, info.notes)


def _detect_family_from_pipeline(pipeline) -> str:
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return "sdxl"
    return "sd2" if pipeline.unet.config.cross_attention_dim == 1024 else "sd15"
