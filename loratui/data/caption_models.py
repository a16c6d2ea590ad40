"""Caption models behind one small interface, loaded from local folders only (never downloaded).

- ``resolve_caption_model(name)``: ``blip-base`` / ``blip-large`` (or any ``org/name`` repo id) found in the
  local Hugging Face cache, or a local folder. Missing models raise ``ModelNotAvailable`` whose message
  gives the exact command to fetch the model on a machine with internet.
- ``load_captioner(path, device=None) -> Captioner``: picks the implementation from the folder's
  ``config.json``:

  ==============================  ==========================================================================
  ``model.onnx`` +                ``WDTagger`` (``loratui.data.wd_tagger``): a WD-style booru tagger run with
  ``selected_tags.csv``           onnxruntime; thresholds and tag formatting from ``TaggerOptions``
  ``model_type == "blip"``        ``BlipForConditionalGeneration`` + ``BlipProcessor``
  ``model_type == "florence2"``   ``Florence2Captioner``: transformers' native Florence-2 with a task prompt
                                  (``<MORE_DETAILED_CAPTION>`` by default)
  ``*ForImageClassification``     ``ImageTagger``: a local multi-label tagger; labels above a threshold
                                  become comma-separated tags (``long_hair`` -> ``long hair``)
  anything else                   ``Vision2SeqCaptioner``: ``AutoModelForImageTextToText`` (or
                                  ``AutoModelForVision2Seq`` on older transformers) + ``AutoProcessor``,
                                  e.g. BLIP-2, GIT where the installed transformers supports them
  ==============================  ==========================================================================

A ``Captioner`` has ``name``, ``produces_tags`` and ``caption(images) -> list[str]`` (PIL RGB images in,
one string out per image). On CUDA, weights run in fp16; on CPU in fp32.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from PIL import Image as PILImage

KNOWN_MODELS: dict[str, str] = {
    "blip-base": "Salesforce/blip-image-captioning-base",
    "blip-large": "Salesforce/blip-image-captioning-large",
}
MAX_NEW_TOKENS = 48
TAG_THRESHOLD = 0.35
FLORENCE_TASKS = ("<MORE_DETAILED_CAPTION>", "<DETAILED_CAPTION>", "<CAPTION>")


class ModelNotAvailable(Exception):
    """The caption model is not on this machine; the message says how to get it."""


class Captioner(Protocol):
    """What the captioning loop needs from a model."""

    name: str
    produces_tags: bool

    def caption(self, images: list[PILImage.Image]) -> list[str]:
        """One caption (or tag string) per image."""
        ...


def _hf_cache_dir() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except Exception:
        return os.path.expanduser("~/.cache/huggingface/hub")


def fetch_instructions(repo_id: str, alias: str | None = None) -> str:
    """The commands to run on a machine with internet to make ``repo_id`` available here."""
    local = f"models/{alias or repo_id.split('/')[-1]}"
    return (
        f"On a machine with internet run:\n"
        f"  hf download {repo_id}\n"
        f"  (older huggingface_hub: huggingface-cli download {repo_id})\n"
        f"then copy its Hugging Face cache ({_hf_cache_dir()}) to this machine, or download into a folder:\n"
        f"  hf download {repo_id} --local-dir {local}\n"
        f"and pass --model {local}"
    )


def resolve_caption_model(name: str) -> Path:
    """A local folder for ``name`` (alias, repo id in the local HF cache, or folder). Never downloads."""
    from loratui.data.model_paths import resolve_local_model

    path = Path(name).expanduser()
    if path.is_dir():
        return path
    repo = KNOWN_MODELS.get(name) or (name if name.count("/") == 1 and not path.exists() else None)
    if repo is None:
        aliases = ", ".join(KNOWN_MODELS)
        raise ModelNotAvailable(
            f"unknown caption model {name!r}: use {aliases}, a repo id or a local model folder"
        )
    found = resolve_local_model(repo)
    if found is None:
        alias = name if name in KNOWN_MODELS else None
        raise ModelNotAvailable(
            f"caption model {name} ({repo}) is not in the local Hugging Face cache and loratui never downloads "
            f"models.\n{fetch_instructions(repo, alias)}"
        )
    return found


def _read_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelNotAvailable(f"{path} has no config.json; is it a Hugging Face model folder?") from exc
    except json.JSONDecodeError as exc:
        raise ModelNotAvailable(f"{path / 'config.json'} is not valid JSON (line {exc.lineno})") from exc


def pick_device(device: str | None) -> str:
    """``device`` or cuda when available, else cpu."""
    import torch

    if device:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ModelNotAvailable(
                "--device cuda was requested but no CUDA GPU is available; use --device cpu"
            )
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


class _TorchModel:
    """Shared loading: device, fp16 on GPU, eval mode, quiet transformers logging."""

    produces_tags = False

    def __init__(
        self,
        path: Path,
        device: str | None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        self.path = path
        # passed to every from_pretrained: code shipped with the folder runs only when the user allowed it
        self.trust_remote_code = trust_remote_code
        self.max_new_tokens = max_new_tokens
        self.name = path.name
        self.device = pick_device(device)
        self.dtype = torch.float16 if self.device.startswith("cuda") else torch.float32

    def _inputs(self, batch: Any) -> Any:
        batch = batch.to(self.device)
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(self.dtype)
        return batch


class BlipCaptioner(_TorchModel):
    """BLIP image captioning (``Salesforce/blip-image-captioning-*`` layout)."""

    def __init__(
        self,
        path: Path,
        device: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(path, device, max_new_tokens, trust_remote_code)
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.processor = BlipProcessor.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=self.trust_remote_code
        )
        self.model = BlipForConditionalGeneration.from_pretrained(
            str(path), local_files_only=True, dtype=self.dtype, trust_remote_code=self.trust_remote_code
        )
        self.model.to(self.device).eval()

    def caption(self, images: list[PILImage.Image]) -> list[str]:
        import torch

        inputs = self._inputs(self.processor(images=images, return_tensors="pt"))
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class Vision2SeqCaptioner(_TorchModel):
    """Any image-to-text model the installed transformers maps to AutoModelForImageTextToText/Vision2Seq."""

    def __init__(
        self,
        path: Path,
        device: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(path, device, max_new_tokens, trust_remote_code)
        import transformers

        auto = getattr(transformers, "AutoModelForImageTextToText", None) or getattr(
            transformers, "AutoModelForVision2Seq", None
        )
        if auto is None:
            raise ModelNotAvailable("this transformers version has no image-to-text auto class")
        self.processor = transformers.AutoProcessor.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=self.trust_remote_code
        )
        try:
            self.model = auto.from_pretrained(
                str(path), local_files_only=True, dtype=self.dtype, trust_remote_code=self.trust_remote_code
            )
        except ValueError as exc:
            raise ModelNotAvailable(
                f"{path} is not an image-captioning model this transformers supports: {exc}"
            ) from exc
        self.model.to(self.device).eval()

    def caption(self, images: list[PILImage.Image]) -> list[str]:
        import torch

        inputs = self._inputs(self.processor(images=images, return_tensors="pt"))
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class Florence2Captioner(_TorchModel):
    """Florence-2 through transformers' own ``Florence2ForConditionalGeneration`` (no shipped code needed),
    or through the code the folder ships when ``trust_remote_code``; ``task`` is one of ``FLORENCE_TASKS``."""

    def __init__(
        self,
        path: Path,
        device: str | None = None,
        max_new_tokens: int = MAX_NEW_TOKENS,
        trust_remote_code: bool = False,
        task: str = FLORENCE_TASKS[0],
    ) -> None:
        super().__init__(path, device, max_new_tokens, trust_remote_code)
        import transformers

        from loratui.data.model_paths import shipped_code

        if task not in FLORENCE_TASKS:
            raise ModelNotAvailable(f"--task must be one of {', '.join(FLORENCE_TASKS)}, not {task!r}")
        model_cls = getattr(transformers, "Florence2ForConditionalGeneration", None)
        if trust_remote_code and shipped_code(path):
            # the code the folder ships (microsoft/Florence-2-*) maps AutoModelForCausalLM to its model
            model_cls = transformers.AutoModelForCausalLM
        if model_cls is None:
            raise ModelNotAvailable(
                f"{path} is a Florence-2 model but this transformers ({transformers.__version__}) has no "
                "native Florence-2; upgrade transformers (4.56 or newer)"
            )
        self.task = task
        self.processor = transformers.AutoProcessor.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=self.trust_remote_code
        )
        self.model = model_cls.from_pretrained(
            str(path), local_files_only=True, dtype=self.dtype, trust_remote_code=self.trust_remote_code
        )
        self.model.to(self.device).eval()

    def caption(self, images: list[PILImage.Image]) -> list[str]:
        import torch

        inputs = self._inputs(
            self.processor(text=[self.task] * len(images), images=images, return_tensors="pt")
        )
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, num_beams=1, do_sample=False
            )
        return [t.strip() for t in self.processor.batch_decode(out, skip_special_tokens=True)]


class ImageTagger(_TorchModel):
    """A local multi-label image classifier used as a tagger (labels above ``threshold`` become tags)."""

    produces_tags = True

    def __init__(
        self,
        path: Path,
        device: str | None = None,
        threshold: float = TAG_THRESHOLD,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__(path, device, trust_remote_code=trust_remote_code)
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        self.processor = AutoImageProcessor.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=self.trust_remote_code
        )
        self.model = AutoModelForImageClassification.from_pretrained(
            str(path), local_files_only=True, dtype=self.dtype, trust_remote_code=self.trust_remote_code
        )
        self.model.to(self.device).eval()
        self.threshold = threshold
        self.multi_label = getattr(self.model.config, "problem_type", None) != "single_label_classification"

    def caption(self, images: list[PILImage.Image]) -> list[str]:
        import torch

        inputs = self._inputs(self.processor(images=images, return_tensors="pt"))
        with torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        probs = torch.sigmoid(logits) if self.multi_label else torch.softmax(logits, dim=-1)
        labels = self.model.config.id2label
        out: list[str] = []
        for row in probs.cpu():
            order = torch.argsort(row, descending=True).tolist()
            tags = [str(labels[i]).replace("_", " ") for i in order if float(row[i]) >= self.threshold]
            out.append(", ".join(tags))
        return out


def load_captioner(
    path: Path,
    device: str | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    *,
    trust_remote_code: bool = False,
    tagger_options: Any = None,
    task: str = FLORENCE_TASKS[0],
) -> Captioner:
    """Load the right ``Captioner`` for a local model folder (see module docstring).

    ``tagger_options`` (a ``wd_tagger.TaggerOptions``) applies to WD-style tagger folders, ``task`` to
    Florence-2. A folder that ships its own code (``auto_map``) is refused unless ``trust_remote_code``;
    nothing asks on stdin."""
    from loratui.data.model_paths import REMOTE_CODE_HINT, shipped_code
    from loratui.data.wd_tagger import TaggerFolderError, WDTagger, is_wd_tagger_folder

    if is_wd_tagger_folder(path):
        try:
            return WDTagger(path, tagger_options, device)
        except TaggerFolderError as exc:
            raise ModelNotAvailable(str(exc)) from exc
    config = _read_config(path)
    code = None if trust_remote_code else shipped_code(path)
    if code:
        raise ModelNotAvailable(f"{path} ships its own model code ({code}); {REMOTE_CODE_HINT}")
    architectures = config.get("architectures") or []
    if config.get("model_type") == "blip":
        return BlipCaptioner(path, device, max_new_tokens, trust_remote_code)
    if config.get("model_type") == "florence2":
        return Florence2Captioner(path, device, max_new_tokens, trust_remote_code, task)
    if any(str(a).endswith("ForImageClassification") for a in architectures):
        return ImageTagger(path, device, trust_remote_code=trust_remote_code)
    return Vision2SeqCaptioner(path, device, max_new_tokens, trust_remote_code)
