"""Generate images with one or several LoRAs at given weights (`loratui sample` for image models).

LoRAs come from `--lora PATH[:WEIGHT]` (repeatable) and from A1111-style prompt tags `<lora:NAME:WEIGHT>`,
resolved as `NAME.safetensors` in `--lora-dir`. The tags are removed from the prompt. LoRAs are loaded with
diffusers' `load_lora_weights(..., adapter_name=)` and combined with `set_adapters(weights)`.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from loratui.data.image_io import save_png

PROMPT_TAG = re.compile(r"<lora:([^:>]+)(?::([-+]?\d*\.?\d+))?>")
DEFAULT_WEIGHT = 1.0


class SampleError(ValueError):
    """A bad --lora spec, a missing LoRA or one made for another model family."""


@dataclass(frozen=True)
class LoraRequest:
    path: Path
    weight: float


def parse_lora_spec(spec: str) -> LoraRequest:
    """`path`, `path:0.7` (a trailing `:number` is the weight; Windows drive letters are left alone)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and re.fullmatch(r"[-+]?\d*\.?\d+", tail):
        return LoraRequest(Path(head).expanduser(), float(tail))
    return LoraRequest(Path(spec).expanduser(), DEFAULT_WEIGHT)


def prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """(prompt without `<lora:NAME:W>` tags, [(NAME, W), ...])."""
    found = [
        (m.group(1).strip(), float(m.group(2)) if m.group(2) else DEFAULT_WEIGHT)
        for m in PROMPT_TAG.finditer(prompt)
    ]
    clean = re.sub(r"\s{2,}", " ", PROMPT_TAG.sub("", prompt)).strip(" ,")
    return clean, found


def resolve_lora_name(name: str, lora_dir: Path | None) -> Path:
    """`NAME` -> `lora_dir/NAME.safetensors` (searched recursively, as A1111 does)."""
    if lora_dir is None:
        raise SampleError(
            f"the prompt uses <lora:{name}:...>; pass --lora-dir FOLDER to find {name}.safetensors"
        )
    folder = Path(lora_dir).expanduser()
    direct = folder / f"{name}.safetensors"
    if direct.is_file():
        return direct
    matches = sorted(folder.rglob(f"{name}.safetensors"))
    if not matches:
        raise SampleError(f"<lora:{name}:...>: no {name}.safetensors in {folder}")
    return matches[0]


def collect_loras(specs: list[str], prompt: str, lora_dir: Path | None) -> tuple[str, list[LoraRequest]]:
    """All LoRAs to apply (flags first, then prompt tags) and the cleaned prompt."""
    requests = [parse_lora_spec(spec) for spec in specs]
    clean, tags = prompt_loras(prompt)
    requests += [LoraRequest(resolve_lora_name(name, lora_dir), weight) for name, weight in tags]
    requests = [_file_of(request) for request in requests]
    for request in requests:
        if not request.path.is_file():
            raise SampleError(f"LoRA file not found: {request.path}")
        if request.path.suffix != ".safetensors":
            raise SampleError(
                f"{request.path}: only .safetensors LoRA files are loaded (pickles can run code)"
            )
    return clean, requests


def _file_of(request: LoraRequest) -> LoraRequest:
    """A folder given as --lora: the diffusers LoRA file inside it, else a SampleError saying what it is."""
    folder = request.path
    if not folder.is_dir():
        return request
    inside = folder / "pytorch_lora_weights.safetensors"
    if inside.is_file():
        return LoraRequest(inside, request.weight)
    if (folder / "adapter_config.json").is_file():
        raise SampleError(
            f"{folder} is a PEFT adapter for a text model; an image base model needs an image LoRA "
            "(.safetensors file): pass a text base model with --base to use this adapter"
        )
    raise SampleError(f"{folder} is a folder; --lora takes an image LoRA .safetensors file")


def _adapter_name(path: Path, position: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{position}"


def check_family(request: LoraRequest, family: str) -> None:
    """Refuse a LoRA trained for another model family, with a clear message."""
    from loratui.models.sd.kohya import LoraFileError, family_from_lora_keys, read_lora_file

    try:
        tensors, meta = read_lora_file(request.path)
    except LoraFileError as exc:
        raise SampleError(str(exc)) from exc
    image_prefixes = ("lora_unet_", "lora_te", "unet.", "text_encoder.", "text_encoder_2.")
    if not any(key.startswith(image_prefixes) for key in tensors):
        first = next(iter(tensors), "no tensors")
        what = (
            "a PEFT adapter for a text model"
            if any(".lora_A." in k or "base_model.model." in k for k in tensors)
            else "not an image LoRA"
        )
        raise SampleError(
            f"{request.path.name} is {what} (first tensor: {first}); the base model is an image model ({family}): "
            "pass an image LoRA, or a text base model with --base"
        )
    versions = {"sd_v1": "sd15", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl"}
    declared = versions.get(meta.get("ss_base_model_version", ""))
    lora_family = declared or family_from_lora_keys(tensors)
    mismatch = lora_family != family if declared else (lora_family == "sdxl") != (family == "sdxl")
    if mismatch:
        raise SampleError(f"{request.path.name} is a {lora_family} LoRA; the base model is {family}")


def load_pipeline(base: str, *, allow_pickle: bool = False):
    """The base pipeline on the best device (fp16 on CUDA, fp32 on CPU)."""
    import torch

    from loratui.models.sd.loading import load_sd_pipeline

    cuda = torch.cuda.is_available()
    loaded = load_sd_pipeline(
        base, allow_pickle=allow_pickle, torch_dtype=torch.float16 if cuda else torch.float32
    )
    pipe = loaded.pipeline.to("cuda" if cuda else "cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe, loaded


def apply_loras(pipe, requests: list[LoraRequest], family: str) -> list[str]:
    """Load every LoRA as its own adapter and activate them with their weights."""
    from loratui.models.sd.loading import quiet_libraries

    names = []
    for position, request in enumerate(requests):
        check_family(request, family)
        name = _adapter_name(request.path, position)
        with quiet_libraries(), warnings.catch_warnings():  # notices about UNet-only LoRAs / several adapters
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
            try:
                pipe.load_lora_weights(str(request.path), adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as exc:
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
                why = next(
                    (ln for ln in lines if "size mismatch" in ln), lines[0] if lines else type(exc).__name__
                )
                raise SampleError(
                    f"{request.path.name} does not fit the base model ({why[:200]}); was it trained on another "
                    "base model?"
                ) from exc
        if not _loaded(pipe, name):
            raise SampleError(
                f"{request.path.name} has no tensor that matches the base model ({family}); was it trained on "
                "another base model?"
            )
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[r.weight for r in requests])
    return names


def _loaded(pipe, name: str) -> bool:
    """Whether diffusers registered the adapter `name` (it silently skips a file none of whose keys fit)."""
    try:
        present = pipe.get_list_adapters()
    except Exception:  # an older diffusers without the listing: trust the load
        return True
    return any(name in adapters for adapters in present.values())


def generate(
    pipe,
    prompt: str,
    *,
    negative_prompt: str = "",
    seed: int = 1,
    steps: int = 25,
    width: int | None = None,
    height: int | None = None,
    guidance: float = 7.0,
    guidance_rescale: float = 0.0,
):
    """One image (PIL) with a fixed CPU-seeded generator (the same picture on every machine type).

    `guidance_rescale`: 0.7 for zero-terminal-SNR models (`loratui.models.sd.schedule.guidance_rescale`)."""
    import torch

    generator = torch.Generator("cpu").manual_seed(seed)
    return pipe(
        prompt,
        negative_prompt=negative_prompt or None,
        num_inference_steps=steps,
        width=width,
        height=height,
        guidance_scale=guidance,
        guidance_rescale=guidance_rescale,
        generator=generator,
    ).images[0]


@dataclass(frozen=True)
class ImageSample:
    """A rendered and saved image: where, its size, the seed and the LoRAs it used."""

    path: Path
    width: int
    height: int
    seed: int
    loras: list[LoraRequest]


def sample_image(
    *,
    base: str,
    lora: list[str] | None = None,
    lora_dir: Path | None = None,
    prompt: str,
    negative_prompt: str = "",
    seed: int = 1,
    steps: int = 25,
    width: int | None = None,
    height: int | None = None,
    guidance: float = 7.0,
    out: Path | None = None,
    allow_pickle: bool = False,
) -> ImageSample:
    """`loratui sample` for Stable Diffusion: render one image with the LoRAs and save it as PNG.

    Raises `SampleError` (bad --lora or tag, wrong family), `BaseModelError` or `FileNotFoundError`.
    """
    from loratui.models.sd.schedule import guidance_rescale

    clean, requests = collect_loras(list(lora or []), prompt, lora_dir)
    pipe, loaded = load_pipeline(base, allow_pickle=allow_pickle)
    apply_loras(pipe, requests, loaded.family)
    image = generate(
        pipe,
        clean,
        negative_prompt=negative_prompt,
        seed=seed,
        steps=steps,
        width=width,
        height=height,
        guidance=guidance,
        guidance_rescale=guidance_rescale(loaded.zero_terminal_snr),
    )
    target = Path(out) if out else Path(f"sample-{seed}.png")
    save_png(image, target)
    return ImageSample(target, image.width, image.height, seed, requests)
