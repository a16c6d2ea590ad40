"""The image dataset as the Stable Diffusion trainer reads it.

Parsing (captions, metadata.csv, kohya `N_name` repeats) is `loratui.data.image_dataset`; this module adds
what training needs on top: a check that refuses unusable datasets with one clear message, the epoch list
(images x repeats), aspect-ratio buckets or centre crops, flips, and caption dropout/shuffling. Every random
choice comes from generators keyed by (seed, epoch, sample index), so a sample looks the same whichever
micro-batch, process or resumed session trains it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loratui.data.image_dataset import ImageDatasetScan, ensure_trigger, scan_image_dataset
from loratui.data.image_io import ImageReadError, open_image_rgb
from loratui.data.regularization import reg_repeats
from loratui.util.seeding import sample_random

#: Stop when more than this fraction of the images cannot be read (below it they are skipped with a warning).
MAX_UNREADABLE_FRACTION = 0.1
BUCKET_STEP = 64
#: Bump when the pixel pipeline changes, so cached latents from older versions are not reused.
PIXEL_PIPELINE_VERSION = 1


class DatasetError(ValueError):
    """A dataset that cannot be trained on; the message lists what is wrong and how to fix it."""


@dataclass
class ImageRecord:
    """One training image (before repeats)."""

    path: Path
    rel: str
    caption: str
    subset: str
    repeats: int
    size: tuple[int, int]  # (width, height), upright
    bucket: tuple[int, int]  # (width, height) it is trained at
    digest: str  # content hash of the file
    is_reg: bool = False  # a regularization (class) image: weighted by prior_loss_weight, no trigger word
    mask_path: Path | None = None  # its loss mask file (mask_dir)


@dataclass(frozen=True)
class SampleView:
    """What sample `index` looks like in `epoch` (cheap to compute: no pixels)."""

    index: int
    record: ImageRecord
    caption: str
    flip: bool
    resized: tuple[int, int]  # (width, height) after resizing, before cropping
    crop_top_left: tuple[int, int]  # (top, left) in resized pixels

    @property
    def bucket(self) -> tuple[int, int]:
        return self.record.bucket

    @property
    def cache_key(self) -> str:
        """Identifies the exact pixels fed to the VAE: file content + size + crop + flip."""
        w, h = self.bucket
        top, left = self.crop_top_left
        return f"{self.record.digest}-{w}x{h}-{top}_{left}-f{int(self.flip)}-p{PIXEL_PIPELINE_VERSION}"

    @property
    def sdxl_time_ids(self) -> list[int]:
        """SDXL micro-conditioning: original size, crop top-left, target size (all height, width)."""
        (ow, oh), (bw, bh) = self.record.size, self.bucket
        top, left = self.crop_top_left
        return [oh, ow, top, left, bh, bw]


# --- buckets ----------------------------------------------------------------------------------------------


def make_buckets(resolution: int, step: int = BUCKET_STEP) -> list[tuple[int, int]]:
    """(width, height) buckets, multiples of `step`, with area <= resolution^2 (kohya-style)."""
    max_area = resolution * resolution
    min_side = max(step, (resolution // 2) // step * step)
    max_side = resolution * 2
    buckets = {(resolution // step * step or step,) * 2}
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side:
            buckets.add((width, height))
            buckets.add((height, width))
    return sorted(buckets)


def choose_bucket(
    size: tuple[int, int], buckets: list[tuple[int, int]], resolution: int, no_upscale: bool
) -> tuple[int, int]:
    """The bucket for an image of `size` (width, height): closest aspect ratio, larger area on ties.

    With `no_upscale`, an image smaller than resolution^2 gets its own bucket (its size rounded down to
    multiples of 64) instead of being enlarged.
    """
    width, height = size
    if no_upscale and width * height <= resolution * resolution:
        return (
            max(BUCKET_STEP, width // BUCKET_STEP * BUCKET_STEP),
            max(BUCKET_STEP, height // BUCKET_STEP * BUCKET_STEP),
        )
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resized_size(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    """Smallest size with the image's aspect ratio that covers the bucket."""
    width, height = size
    scale = max(bucket[0] / width, bucket[1] / height)
    return max(bucket[0], round(width * scale)), max(bucket[1], round(height * scale))


# --- captions --------------------------------------------------------------------------------------------


def process_caption(
    caption: str,
    *,
    trigger_word: str | None,
    shuffle_tags: bool,
    keep_tokens: int,
    caption_dropout: float,
    seed: int,
    epoch: int,
    index: int,
) -> str:
    """Trigger word (prepended when missing), tag shuffle (first `keep_tokens` tags stay), dropout."""
    text = ensure_trigger(caption, trigger_word)
    if shuffle_tags:
        tags = [t.strip() for t in text.split(",") if t.strip()]
        kept, rest = tags[:keep_tokens], tags[keep_tokens:]
        sample_random(seed, epoch, index, "shuffle_tags").shuffle(rest)
        text = ", ".join(kept + rest)
    if (
        caption_dropout > 0
        and sample_random(seed, epoch, index, "caption_dropout").random() < caption_dropout
    ):
        text = ""
    return text


# --- the dataset ----------------------------------------------------------------------------------------


@dataclass
class DatasetOptions:
    """The config values the dataset uses."""

    resolution: int
    bucket: bool = False
    bucket_no_upscale: bool = True
    random_crop: bool = False
    flip_aug: bool = False
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    keep_tokens: int = 0
    trigger_word: str | None = None
    seed: int = 0
    prior_loss_weight: float = 1.0
    mask_dir: Path | None = None
    alpha_mask: bool = False

    @classmethod
    def from_config(cls, cfg) -> DatasetOptions:
        return cls(
            resolution=cfg.resolution,
            bucket=cfg.bucket,
            bucket_no_upscale=cfg.bucket_no_upscale,
            random_crop=cfg.random_crop,
            flip_aug=cfg.flip_aug,
            caption_dropout=cfg.caption_dropout,
            shuffle_tags=cfg.shuffle_tags,
            keep_tokens=cfg.keep_tokens,
            trigger_word=cfg.trigger_word,
            seed=cfg.seed,
            prior_loss_weight=cfg.prior_loss_weight,
            mask_dir=Path(cfg.mask_dir).expanduser() if cfg.mask_dir else None,
            alpha_mask=cfg.alpha_mask,
        )

    @property
    def captions_fixed(self) -> bool:
        """True when a sample's caption is the same in every epoch (text-encoder outputs can be cached)."""
        return self.caption_dropout == 0 and not self.shuffle_tags

    @property
    def uses_masks(self) -> bool:
        """True when the loss is weighted by per-pixel masks."""
        return self.mask_dir is not None or self.alpha_mask


class SDDataset:
    """Images x repeats (training images first, then the regularization samples), with per-sample
    deterministic augmentation."""

    def __init__(self, records: list[ImageRecord], scan: ImageDatasetScan, options: DatasetOptions):
        self.records = records
        self.scan = scan
        self.options = options
        self.sample_records: list[int] = [i for i, rec in enumerate(records) for _ in range(rec.repeats)]

    def __len__(self) -> int:
        return len(self.sample_records)

    @property
    def num_images(self) -> int:
        """Training images (regularization images not counted)."""
        return sum(1 for rec in self.records if not rec.is_reg)

    @property
    def num_reg_samples(self) -> int:
        """Regularization samples per epoch."""
        return sum(rec.repeats for rec in self.records if rec.is_reg)

    def loss_weight(self, view: SampleView) -> float:
        """prior_loss_weight for a regularization sample, 1 for a training sample (as kohya)."""
        return self.options.prior_loss_weight if view.record.is_reg else 1.0

    def mask(self, view: SampleView) -> torch.Tensor | None:
        """[1, H, W] loss mask in [0, 1] of a sample view (same resize, crop and flip as its pixels), or
        None when masks are off; regularization images only have alpha masks."""
        import numpy as np

        from loratui.data.masks import open_alpha_mask, open_mask

        opts, record = self.options, view.record
        if record.mask_path is not None:
            image = open_mask(record.mask_path)
        elif opts.alpha_mask:
            image = open_alpha_mask(record.path)
        else:
            return None
        if image.size != record.size:
            raise DatasetError(
                f"mask of {record.rel} is {image.size[0]}x{image.size[1]}, the image {record.size[0]}x"
                f"{record.size[1]}; re-export the mask at the image's size (`loratui check` lists them)"
            )
        array = np.asarray(_transformed(image, view), dtype=np.float32) / 255.0
        return torch.from_numpy(array.copy()).unsqueeze(0)

    def view(self, index: int, epoch: int) -> SampleView:
        """Caption, flip and crop of sample `index` in `epoch`."""
        opts = self.options
        record = self.records[self.sample_records[index]]
        caption = process_caption(
            record.caption,
            trigger_word=None if record.is_reg else opts.trigger_word,
            shuffle_tags=opts.shuffle_tags,
            keep_tokens=opts.keep_tokens,
            caption_dropout=opts.caption_dropout,
            seed=opts.seed,
            epoch=epoch,
            index=index,
        )
        flip = opts.flip_aug and sample_random(opts.seed, epoch, index, "flip").random() < 0.5
        resized = resized_size(record.size, record.bucket)
        spare_x, spare_y = resized[0] - record.bucket[0], resized[1] - record.bucket[1]
        if opts.random_crop:
            rng = sample_random(opts.seed, epoch, index, "crop")
            top, left = rng.randint(0, spare_y), rng.randint(0, spare_x)
        else:
            top, left = spare_y // 2, spare_x // 2
        return SampleView(index, record, caption, flip, resized, (top, left))

    def pixels(self, view: SampleView) -> torch.Tensor:
        """[3, H, W] float tensor in [-1, 1] for a sample view."""
        import numpy as np

        image = _transformed(open_image_rgb(view.record.path), view)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def views_for_caching(self) -> list[SampleView]:
        """Every distinct (image, crop, flip) the run can use, when crops are deterministic."""
        seen: dict[str, SampleView] = {}
        first_sample = {}
        for index, record_index in enumerate(self.sample_records):
            first_sample.setdefault(record_index, index)
        for index in first_sample.values():
            base = self.view(index, 0)
            variants = [base] + ([_flipped(base)] if self.options.flip_aug else [])
            for view in variants:
                seen.setdefault(view.cache_key, view)
        return list(seen.values())

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_dataset_dirs`: {folder: {n_repeats, img_count}} over the images really trained."""
        out: dict[str, dict[str, int]] = {}
        for record in self.records:
            if record.is_reg:
                continue
            name = self._dir_name(record.subset)
            entry = out.setdefault(name, {"n_repeats": record.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's `ss_tag_frequency`: {folder: {tag: images}} (trigger word included when prepended)."""
        out: dict[str, dict[str, int]] = {}
        for record in self.records:
            if record.is_reg:
                continue
            counts = out.setdefault(self._dir_name(record.subset), {})
            caption = ensure_trigger(record.caption, self.options.trigger_word)
            for tag in {t.strip() for t in caption.split(",") if t.strip()}:
                counts[tag] = counts.get(tag, 0) + 1
        return out

    def reg_metadata(self) -> dict[str, str]:
        """kohya's `ss_num_reg_images`, `ss_reg_dataset_dirs` and `ss_prior_loss_weight` (empty without
        regularization images)."""
        import json

        reg = [record for record in self.records if record.is_reg]
        if not reg:
            return {}
        dirs: dict[str, dict[str, int]] = {}
        for record in reg:
            entry = dirs.setdefault(record.subset, {"n_repeats": record.repeats, "img_count": 0})
            entry["img_count"] += 1
        return {
            "ss_num_reg_images": str(self.num_reg_samples),
            "ss_reg_dataset_dirs": json.dumps(dirs, ensure_ascii=False),
            "ss_prior_loss_weight": str(self.options.prior_loss_weight),
        }

    def _dir_name(self, subset: str) -> str:
        return self.scan.root.name if subset == "." else subset


def _transformed(image, view: SampleView):
    """`image` (PIL, the record's upright size) resized, cropped and flipped as `view` says."""
    from PIL import Image

    width, height = view.resized
    if (width, height) != image.size:
        downscale = width * height < image.size[0] * image.size[1]
        method = Image.Resampling.LANCZOS if downscale else Image.Resampling.BICUBIC
        image = image.resize((width, height), method)
    top, left = view.crop_top_left
    bw, bh = view.bucket
    image = image.crop((left, top, left + bw, top + bh))
    if view.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image


def _flipped(view: SampleView) -> SampleView:
    return SampleView(view.index, view.record, view.caption, not view.flip, view.resized, view.crop_top_left)


# --- loading and checking ----------------------------------------------------------------------------------


def _finding_text(finding, limit: int = 10) -> str:
    lines = [f"- {finding.message}" + (f" ({finding.count})" if finding.count > 1 else "")]
    for example in finding.examples[:limit]:
        detail = f": {example.detail}" if example.detail else ""
        lines.append(f"    {example.location()}{detail}")
    if finding.count > limit and len(finding.examples) >= limit:
        lines.append(f"    ... and {finding.count - limit} more")
    if finding.fix:
        lines.append(f"  fix: {finding.fix}")
    return "\n".join(lines)


def scan_dataset(cfg, *, allow_errors: bool = False, reg: bool = False) -> ImageDatasetScan:
    """Scan the dataset folder (`reg`: the regularization folder); DatasetError when it is missing, empty or
    (unless `allow_errors`, from `--skip-checks`) has errors."""
    root = Path(cfg.reg_data_dir if reg else cfg.train_data_dir).expanduser()
    metadata = Path(cfg.metadata_path).expanduser() if cfg.metadata_path and not reg else None
    if metadata is not None and not metadata.is_file():
        raise DatasetError(f"metadata file not found: {metadata}")
    try:
        scan = scan_image_dataset(
            root,
            metadata_path=metadata,
            caption_extensions=(cfg.caption_extension,),
            trigger_word=None if reg else cfg.trigger_word,
        )
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise DatasetError(str(exc)) from exc
    errors = [f for f in scan.findings if f.severity == "error"]
    if (errors and not allow_errors) or not scan.items:
        what = "regularization" if reg else "training"
        body = "\n".join(_finding_text(f) for f in errors) or f"- no {what} images in {root}"
        raise DatasetError(
            f"the {'regularization images' if reg else 'dataset'} in {root} cannot be trained on:\n{body}\n(`loratui check {root}` shows the full report)"
        )
    return scan


def _digest(path: Path) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def load_dataset(
    cfg, *, warn: Callable[[str], None] = lambda _msg: None, allow_errors: bool = False
) -> SDDataset:
    """Scan, check and read every image once (sizes, content hashes); unreadable images are skipped.

    With `reg_data_dir`, the regularization images follow the training images, balanced against the training
    samples as kohya does (`loratui.data.regularization.reg_repeats`). Raises DatasetError for unusable
    datasets, when more than 10 % of the images cannot be read, and for missing masks.
    """
    scan = scan_dataset(cfg, allow_errors=allow_errors)
    options = DatasetOptions.from_config(cfg)
    records = _read_records(scan, cfg, warn, allow_errors, is_reg=False)
    if options.mask_dir is not None:
        _attach_masks(records, options.mask_dir, warn, allow_errors)
    if cfg.reg_data_dir:
        reg_scan = scan_dataset(cfg, allow_errors=allow_errors, reg=True)
        reg_records = _read_records(reg_scan, cfg, warn, allow_errors, is_reg=True)
        train_samples = sum(rec.repeats for rec in records)
        balanced = reg_repeats(train_samples, [r.repeats for r in reg_records])
        for record, repeats in zip(reg_records, balanced, strict=True):
            record.repeats = repeats
        unused = sum(1 for rec in reg_records if not rec.repeats)
        if unused:
            warn(
                f"{unused} of {len(reg_records)} regularization images are not used (more than the training samples)"
            )
        records += [rec for rec in reg_records if rec.repeats]
    return SDDataset(records, scan, options)


def _attach_masks(
    records: list[ImageRecord], mask_dir: Path, warn: Callable[[str], None], allow_errors: bool
) -> None:
    """Each record's mask file; missing or mis-sized masks stop the run (with `--skip-checks`: a warning,
    and the image is trained whole)."""
    from loratui.data.masks import mask_path_for, open_mask

    problems = []
    for record in records:
        path = mask_path_for(mask_dir, record.rel)
        if path is None:
            problems.append(f"{record.rel}: no mask")
            continue
        try:
            size = open_mask(path).size
        except ImageReadError as exc:
            problems.append(f"{record.rel}: {exc.reason}")
            continue
        if size != record.size:
            problems.append(
                f"{record.rel}: mask {size[0]}x{size[1]}, image {record.size[0]}x{record.size[1]}"
            )
            continue
        record.mask_path = path
    if not problems:
        return
    listing = "\n".join(f"    {line}" for line in problems[:20])
    if allow_errors:
        warn(f"{len(problems)} image(s) without a usable mask are trained whole:\n{listing}")
        return
    raise DatasetError(
        f"{len(problems)} image(s) have no usable mask in {mask_dir} (same relative path and name, any image "
        f"extension, the image's size); fix them or drop mask_dir (`loratui check` lists them):\n{listing}"
    )


def _read_records(
    scan: ImageDatasetScan, cfg, warn: Callable[[str], None], allow_errors: bool, *, is_reg: bool
) -> list[ImageRecord]:
    """The scan's readable images with their sizes, buckets and content hashes; findings become warnings."""
    prefix = "regularization images: " if is_reg else ""
    for finding in scan.findings:
        if finding.severity == "warning" or (allow_errors and finding.severity == "error"):
            where = ", ".join(e.location() for e in finding.examples[:5])
            more = f" (+{finding.count - 5} more)" if finding.count > 5 else ""
            warn(f"{prefix}{finding.message} {where}{more}".strip())
    buckets = make_buckets(cfg.resolution) if cfg.bucket else []
    records: list[ImageRecord] = []
    bad: list[str] = []
    for item in scan.items:
        try:
            image = open_image_rgb(item.path)
        except ImageReadError as exc:
            bad.append(f"{item.rel}: {exc.reason}")
            continue
        size = image.size
        image.close()
        bucket = (
            choose_bucket(size, buckets, cfg.resolution, cfg.bucket_no_upscale)
            if cfg.bucket
            else (cfg.resolution, cfg.resolution)
        )
        records.append(
            ImageRecord(
                item.path,
                item.rel,
                item.caption,
                item.subset,
                item.repeats,
                size,
                bucket,
                _digest(item.path),
                is_reg=is_reg,
            )
        )
    if bad:
        listing = "\n".join(f"    {line}" for line in bad[:20])
        if not records or len(bad) > MAX_UNREADABLE_FRACTION * len(scan.items):
            raise DatasetError(
                f"{prefix}{len(bad)} of {len(scan.items)} images cannot be read (more than "
                f"{MAX_UNREADABLE_FRACTION:.0%}); fix or remove them:\n{listing}"
            )
        warn(f"{prefix}skipping {len(bad)} unreadable image(s):\n{listing}")
    return records
