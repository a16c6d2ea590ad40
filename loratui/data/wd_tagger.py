"""WD-style booru taggers (``model.onnx`` + ``selected_tags.csv``) run with onnxruntime.

The folder layout is the one the WD v3 taggers are distributed in:

- ``selected_tags.csv`` with the header ``tag_id,name,category,count``; category 9 is a rating
  (``general``, ``sensitive``, ``questionable``, ``explicit``), 4 a character, 0 (and anything else) a
  general tag. Row *i* names output *i* of the model.
- ``model.onnx``: input NHWC float32, BGR, 0..255, the image padded to a square on white and resized to the
  size declared in the input shape (448 for the v3 taggers); output one probability per tag.

Tags are chosen with ``TaggerOptions``: characters at or above ``character_threshold`` first, then general
tags at or above ``general_threshold``, each group by descending probability; the most probable rating
first when ``include_rating``. ``long_hair`` becomes ``long hair`` unless the tag is a kaomoji (``^_^``).

Public API: ``is_wd_tagger_folder``, ``read_tag_list``, ``TaggerOptions``, ``WDTagger``, ``select_tags``,
``prepare_image``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image as PILImage

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
TAGS_HEADER = ("tag_id", "name", "category", "count")
RATING, GENERAL, CHARACTER = 9, 0, 4
DEFAULT_SIZE = 448
# tags whose underscore is part of the face, as the WD tagger demo and kohya's script keep them
KAOMOJIS = frozenset(
    {
        "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3",
        "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
    }
)  # fmt: skip
INSTALL_HINT = 'onnxruntime is not installed; install it with: pip install "loratui[tagger]"'


class TaggerFolderError(Exception):
    """The tagger folder cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Tag:
    """One row of selected_tags.csv."""

    name: str
    category: int


@dataclass
class TaggerOptions:
    """How probabilities become a tag string."""

    general_threshold: float = 0.35
    character_threshold: float = 0.85
    include_rating: bool = False
    underscores_to_spaces: bool = True
    exclude_tags: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("general_threshold", "character_threshold"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be between 0 and 1, not {value}")


def is_wd_tagger_folder(path: Path) -> bool:
    """True when ``path`` looks like a WD-style tagger folder: it holds a ``selected_tags.csv``, or a
    ``model.onnx`` without a transformers ``config.json`` (the tagger repositories' own config.json is a
    timm one, next to selected_tags.csv)."""
    path = Path(path)
    if (path / TAGS_FILE).is_file():
        return True
    return (path / MODEL_FILE).is_file() and not (path / "config.json").is_file()


def read_tag_list(csv_path: Path) -> list[Tag]:
    """The tags of a ``selected_tags.csv``. Raises ``TaggerFolderError`` naming the file and line."""
    if not csv_path.is_file():
        raise TaggerFolderError(
            f"{csv_path} is missing: a WD tagger folder needs {MODEL_FILE} and {TAGS_FILE} "
            "(copy both files of the tagger repository into the folder)"
        )
    tags: list[Tag] = []
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != list(TAGS_HEADER[:3]):
            raise TaggerFolderError(
                f"{csv_path}:1: expected the header {','.join(TAGS_HEADER)}, found {','.join(header or [])!r}"
            )
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                tags.append(Tag(row[1], int(row[2])))
            except (IndexError, ValueError) as exc:
                raise TaggerFolderError(
                    f"{csv_path}:{line}: expected tag_id,name,category,count with an integer category"
                ) from exc
    if not tags:
        raise TaggerFolderError(f"{csv_path} lists no tags")
    return tags


def format_tag(name: str, underscores_to_spaces: bool) -> str:
    """``long_hair`` -> ``long hair`` (when asked); kaomojis such as ``^_^`` keep their underscore."""
    if underscores_to_spaces and name not in KAOMOJIS:
        return name.replace("_", " ")
    return name


def _normal(tag: str) -> str:
    return tag.strip().lower().replace("_", " ")


def select_tags(probs: Any, tags: list[Tag], options: TaggerOptions) -> list[str]:
    """The tags of one image (probabilities in csv order), ordered as the module docstring says."""
    excluded = {_normal(t) for t in options.exclude_tags if t.strip()}
    scored = sorted(((float(p), i) for i, p in enumerate(probs)), key=lambda x: (-x[0], x[1]))
    characters = [i for p, i in scored if tags[i].category == CHARACTER and p >= options.character_threshold]
    general = [
        i for p, i in scored if tags[i].category not in (CHARACTER, RATING) and p >= options.general_threshold
    ]
    ratings = [i for _, i in scored if tags[i].category == RATING][:1] if options.include_rating else []
    out: list[str] = []
    for i in ratings + characters + general:
        if _normal(tags[i].name) in excluded:
            continue
        out.append(format_tag(tags[i].name, options.underscores_to_spaces))
    return out


def prepare_image(image: PILImage.Image, size: int) -> np.ndarray:
    """HWC float32 BGR 0..255: ``image`` centred on a white square, resized to ``size`` (bicubic)."""
    import numpy as np
    from PIL import Image

    rgb = image.convert("RGB")
    side = max(rgb.size)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(rgb, ((side - rgb.width) // 2, (side - rgb.height) // 2))
    if side != size:
        canvas = canvas.resize((size, size), Image.BICUBIC)
    return np.asarray(canvas, dtype=np.float32)[:, :, ::-1].copy()


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise TaggerFolderError(INSTALL_HINT) from exc
    return onnxruntime


def _providers(ort: Any, device: str | None) -> list[str]:
    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device and device.startswith("cuda") and "CUDAExecutionProvider" not in available:
        raise TaggerFolderError(
            "--device cuda was requested but this onnxruntime has no CUDA provider "
            "(install onnxruntime-gpu, or use --device cpu)"
        )
    wanted = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available] or available


class WDTagger:
    """A WD-style ONNX tagger as a ``Captioner`` (``produces_tags``; one tag string per image)."""

    produces_tags = True

    def __init__(self, path: Path, options: TaggerOptions | None = None, device: str | None = None) -> None:
        self.path = Path(path)
        self.name = self.path.name
        self.options = options or TaggerOptions()
        self.options.validate()
        model_file = self.path / MODEL_FILE
        if not model_file.is_file():
            raise TaggerFolderError(
                f"{model_file} is missing: a WD tagger folder needs {MODEL_FILE} and {TAGS_FILE}"
            )
        self.tags = read_tag_list(self.path / TAGS_FILE)
        ort = _import_onnxruntime()
        try:
            self.session = ort.InferenceSession(str(model_file), providers=_providers(ort, device))
        except Exception as exc:  # onnxruntime raises its own exception types for broken files
            raise TaggerFolderError(f"{model_file} could not be loaded by onnxruntime: {exc}") from exc
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        shape = list(inp.shape)
        if len(shape) != 4 or shape[3] not in (3, "3"):
            raise TaggerFolderError(
                f"{model_file}: expected an NHWC image input (batch, height, width, 3), found {shape}"
            )
        self.size = shape[1] if isinstance(shape[1], int) else DEFAULT_SIZE
        self.fixed_batch = shape[0] if isinstance(shape[0], int) else None
        out_shape = list(self.session.get_outputs()[0].shape)
        n_out = out_shape[-1] if out_shape else None
        if isinstance(n_out, int) and n_out != len(self.tags):
            raise TaggerFolderError(
                f"{self.path / TAGS_FILE} lists {len(self.tags)} tags but {model_file} outputs {n_out} "
                "probabilities: the two files are from different taggers (copy both from the same repository)"
            )

    def probabilities(self, images: list[PILImage.Image]) -> np.ndarray:
        """(images, tags) probabilities; a model whose output is not in 0..1 gets a sigmoid."""
        import numpy as np

        batch = np.stack([prepare_image(im, self.size) for im in images])
        step = self.fixed_batch or len(images)
        parts = [
            self.session.run(None, {self.input_name: batch[i : i + step]})[0]
            for i in range(0, len(images), step)
        ]
        probs = np.concatenate(parts).astype(np.float32)
        if probs.shape[-1] != len(self.tags):
            raise TaggerFolderError(
                f"{self.path / TAGS_FILE} lists {len(self.tags)} tags but the model returned "
                f"{probs.shape[-1]} probabilities per image"
            )
        if probs.size and (probs.min() < 0.0 or probs.max() > 1.0):
            probs = 1.0 / (1.0 + np.exp(-probs))
        return probs

    def caption(self, images: list[PILImage.Image]) -> list[str]:
        if not images:
            return []
        probs = self.probabilities(images)
        return [", ".join(select_tags(row, self.tags, self.options)) for row in probs]
