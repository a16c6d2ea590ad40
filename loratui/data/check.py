"""Dataset checks run by ``loratui check`` and by the trainers before training. Pure: no printing.

Public API (stable):

- ``run_checks(path, *, task=None, resolution=512, batch_size=1, tokenizer_path=None, max_seq_len=None,
  trigger_word=None, deep=False, metadata_path=None, caption_extensions=(".txt", ".caption"),
  workers=None) -> Report``: detects the task when ``task`` is None ("image", "text", or "preference" for
  records with ``chosen``/``rejected`` answers); "kto" checks preference data that may be unpaired.
- ``run_image_checks(root, ...) -> Report``, ``run_text_checks(path, ...) -> Report`` and
  ``run_preference_checks(path, ...) -> Report``.
- ``detect_task(path) -> "image" | "text" | None`` and ``tokenizer_path_for(base_model, task)``.

``Report.exit_code`` is 0 without errors, 1 with errors, 2 when the input is unusable (missing, empty,
not a dataset). Finding codes are listed in ``loratui.data.codes``.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from loratui.data.codes import describe
from loratui.data.findings import Example, FindingBag, Report
from loratui.data.image_checks import EXTENSION_FORMATS, FileInspection, content_digests, inspect_image_file
from loratui.data.image_dataset import (
    DEFAULT_CAPTION_EXTENSIONS,
    ImageDatasetScan,
    caption_label,
    scan_image_dataset,
)
from loratui.data.image_io import IMAGE_EXTENSIONS
from loratui.data.masks import mask_findings
from loratui.data.perceptual_hash import DEFAULT_MAX_DISTANCE, near_duplicate_pairs
from loratui.data.preference_dataset import PreferenceRecord, detect_preference
from loratui.data.regularization import sample_counts
from loratui.data.text_dataset import TEXT_EXTENSIONS, TextRecord, read_text_dataset
from loratui.data.token_count import (
    CLIP_APPROXIMATION,
    CLIP_MAX_TOKENS,
    TEXT_APPROXIMATION,
    clip_token_counts,
    load_local_tokenizer,
    text_token_counts,
)

MIN_SIDE = 64
MAX_ASPECT = 4.0
TOP_TAGS = 30
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _unusable(
    path: Path, task: str | None, code: str, detail: str = "", bag: FindingBag | None = None
) -> Report:
    bag = bag or FindingBag()
    bag.add(code, Example(str(path), None, detail))
    return Report(findings=bag.to_list(), summary={}, task=task, path=str(path), unusable=True)


def detect_task(path: Path) -> str | None:
    """ "text" for .json/.jsonl files or folders of them, "image" for folders with images, else None."""
    path = Path(path)
    if path.is_file():
        return "text" if path.suffix.lower() in TEXT_EXTENSIONS else None
    if not path.is_dir():
        return None
    has_text = False
    for _dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            ext = os.path.splitext(name)[1].lower()
            if ext in IMAGE_EXTENSIONS and not name.startswith("."):
                return "image"
            has_text = has_text or ext in TEXT_EXTENSIONS
    return "text" if has_text else None


def tokenizer_path_for(base_model: str | Path | None, task: str) -> Path | None:
    """The local tokenizer folder of a base model: ``<model>/tokenizer`` (SD) or the model folder (LLM).

    ``base_model`` may be a folder or a repo id already in the local HF cache; nothing is downloaded.
    """
    if not base_model:
        return None
    from loratui.data.model_paths import resolve_local_model

    base = resolve_local_model(base_model)
    if base is None:
        return None
    if task == "image":
        sub = base / "tokenizer"
        return sub if sub.is_dir() else None
    return base if any((base / f).exists() for f in _TOKENIZER_FILES) else None


def _tokenizer_fix(why: str) -> str | None:
    """The fix for a tokenizer that was not loaded because it ships code; None keeps the catalogue's."""
    if "--trust-remote-code" in why:
        return "Read the code in the tokenizer folder; if you trust it, pass --trust-remote-code."
    return None


def run_checks(
    path: Path,
    *,
    task: str | None = None,
    resolution: int = 512,
    batch_size: int = 1,
    tokenizer_path: Path | None = None,
    max_seq_len: int | None = None,
    trigger_word: str | None = None,
    deep: bool = False,
    metadata_path: Path | None = None,
    caption_extensions: tuple[str, ...] | list[str] = DEFAULT_CAPTION_EXTENSIONS,
    workers: int | None = None,
    trust_remote_code: bool = False,
    reg_data_dir: Path | None = None,
    mask_dir: Path | None = None,
    alpha_mask: bool = False,
) -> Report:
    """Check an image or text dataset and return a ``Report`` (never raises for dataset problems).

    Images: ``reg_data_dir`` is checked like the training folder (its findings name the files under it);
    ``mask_dir``/``alpha_mask`` check the loss masks (``loratui.data.masks``)."""
    path = Path(path)
    if not path.exists():
        return _unusable(path, task, "path_not_found")
    detected = detect_task(path)
    if task is None and detected == "text":
        detected = detect_preference(path) or detected  # chosen/rejected or labelled records: not SFT ones
    task = task or detected
    if task is None:
        return _unusable(path, None, "not_a_dataset")
    if task == "image":
        if not path.is_dir():
            return _unusable(path, task, "not_a_dataset", "image datasets are folders")
        return run_image_checks(
            path,
            resolution=resolution,
            batch_size=batch_size,
            tokenizer_path=tokenizer_path,
            trigger_word=trigger_word,
            deep=deep,
            metadata_path=metadata_path,
            caption_extensions=caption_extensions,
            workers=workers,
            trust_remote_code=trust_remote_code,
            reg_data_dir=reg_data_dir,
            mask_dir=mask_dir,
            alpha_mask=alpha_mask,
        )
    if task == "text":
        return run_text_checks(
            path, tokenizer_path=tokenizer_path, max_seq_len=max_seq_len, trust_remote_code=trust_remote_code
        )
    if task in ("preference", "kto"):
        return run_preference_checks(
            path,
            tokenizer_path=tokenizer_path,
            max_seq_len=max_seq_len,
            trust_remote_code=trust_remote_code,
            paired=task == "preference",
        )
    raise ValueError(f"unknown task {task!r}: use 'image', 'text', 'preference' or 'kto'")


# --- images -------------------------------------------------------------------------------------


def _default_workers() -> int:
    return min(8, 2 * (os.cpu_count() or 2))


def _inspect_all(scan: ImageDatasetScan, deep: bool, workers: int) -> list[FileInspection]:
    paths = [item.path for item in scan.items]
    if workers <= 1 or len(paths) < 16:
        return [inspect_image_file(i, p, deep=deep) for i, p in enumerate(paths)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(
            pool.map(lambda ip: inspect_image_file(ip[0], ip[1], deep=deep), enumerate(paths), chunksize=32)
        )


def _file_findings(
    scan: ImageDatasetScan, results: list[FileInspection], resolution: int, bag: FindingBag
) -> None:
    for res in results:
        item = scan.items[res.index]
        rel = item.rel
        if res.problem:
            bag.add(res.problem, Example(rel, None, res.detail))
            continue
        info = res.info
        if info is None:
            continue
        w, h = info.width, info.height
        expected = EXTENSION_FORMATS.get(item.path.suffix.lower(), set())
        if expected and info.format not in expected:
            bag.add("extension_mismatch", Example(rel, None, f"{item.path.suffix} file is {info.format}"))
        if min(w, h) < MIN_SIDE:
            bag.add("tiny_image", Example(rel, None, f"{w}x{h}"))
        elif min(w, h) < resolution:
            bag.add("image_too_small", Example(rel, None, f"{w}x{h} < {resolution}"))
        if min(w, h) > 0 and max(w, h) / min(w, h) > MAX_ASPECT:
            bag.add("extreme_aspect_ratio", Example(rel, None, f"{w}x{h} ({max(w, h) / min(w, h):.1f}:1)"))
        if info.rotated:
            bag.add("exif_rotation", Example(rel, None, f"orientation {info.exif_orientation}"))
        if info.n_frames > 1:
            bag.add("animated_image", Example(rel, None, f"{info.n_frames} frames"))
        if info.has_alpha:
            bag.add("alpha_channel", Example(rel, None, info.mode))
        if info.mode == "CMYK":
            bag.add("cmyk_image", Example(rel))
        elif info.mode == "P" and not info.has_alpha:
            bag.add("palette_image", Example(rel))
        elif info.mode in ("L", "1"):
            bag.add("grayscale_image", Example(rel))
        if info.bits > 8 or info.mode.startswith("I") or info.mode == "F":
            bag.add("high_bit_depth", Example(rel, None, f"{info.mode}, {info.bits} bits"))
        if res.trailing_data:
            bag.add("trailing_data", Example(rel))


def _hash_same_sized(scan: ImageDatasetScan, results: list[FileInspection], workers: int) -> None:
    """Fill ``digest`` for readable files whose size and head/tail hash another file shares.

    Only such files can be byte-identical, so typical datasets hash almost nothing in full.
    """
    by_size: dict[tuple[int, bytes | None], list[FileInspection]] = {}
    for res in results:
        if not res.problem and res.size_bytes:
            by_size.setdefault((res.size_bytes, res.quick_key), []).append(res)
    todo = [res for group in by_size.values() if len(group) > 1 for res in group]
    paths = [scan.items[res.index].path for res in todo]
    if workers > 1 and len(paths) >= 16:
        chunks = [paths[i : i + 64] for i in range(0, len(paths), 64)]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            digests = [d for part in pool.map(content_digests, chunks) for d in part]
    else:
        digests = content_digests(paths)
    for res, digest in zip(todo, digests, strict=True):
        res.digest = digest


def _duplicate_findings(
    scan: ImageDatasetScan, results: list[FileInspection], deep: bool, bag: FindingBag, workers: int
) -> dict[str, int]:
    _hash_same_sized(scan, results, workers)
    first_by_digest: dict[bytes, int] = {}
    exact_pairs: set[tuple[int, int]] = set()
    for res in results:
        if res.digest is None or res.problem:
            continue
        first = first_by_digest.setdefault(res.digest, res.index)
        if first != res.index:
            exact_pairs.add((first, res.index))
            bag.add(
                "exact_duplicate",
                Example(scan.items[res.index].rel, None, f"same bytes as {scan.items[first].rel}"),
            )
    hashes = [res.dhash if not res.problem else None for res in results]
    hashed = sum(h is not None for h in hashes)
    exact_members = {j for _, j in exact_pairs}
    for i, j, d in near_duplicate_pairs(hashes, DEFAULT_MAX_DISTANCE):
        if (i, j) in exact_pairs or j in exact_members or i in exact_members:
            continue
        bag.add(
            "near_duplicate",
            Example(scan.items[j].rel, None, f"looks like {scan.items[i].rel} ({d}/64 bits differ)"),
        )
    unhashed = [r for r in results if not r.problem and r.info and r.info.format not in ("JPEG", "MPO")]
    if not deep and unhashed:
        bag.add(
            "near_duplicate_coverage",
            count=len(unhashed),
            message=(
                f"Near-duplicate detection covered the JPEG files only ({hashed} hashed from a reduced 1/8-scale "
                f"decode); {len(unhashed)} PNG/WebP/BMP/GIF files were compared byte-for-byte only."
            ),
        )
    return {"near_duplicate_hashed": hashed}


def _caption_findings(
    scan: ImageDatasetScan,
    tokenizer_path: Path | None,
    bag: FindingBag,
    summary: dict[str, object],
    trust_remote_code: bool = False,
) -> None:
    captioned = [item for item in scan.items if item.caption]
    tokenizer, why = (
        (None, "")
        if tokenizer_path is None
        else load_local_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    )
    counts = clip_token_counts([item.caption for item in captioned], tokenizer)
    approx = tokenizer is None
    long_ = [(item, n) for item, n in zip(captioned, counts, strict=True) if n > CLIP_MAX_TOKENS]
    if long_:
        sev, msg, fix = describe("caption_too_long")
        how = f" ({CLIP_APPROXIMATION})" if approx else f" (counted with the tokenizer in {tokenizer_path})"
        for item, n in long_:
            bag.add(
                "caption_too_long",
                Example(
                    caption_label(item, scan.root), item.caption_line, f"{'~' if approx else ''}{n} tokens"
                ),
                message=msg + how,
            )
    if approx and captioned:
        why = why or "no --config with a local base model folder"
        bag.add(
            "tokenizer_unavailable",
            message=f"Caption token counts are an {CLIP_APPROXIMATION} ({why}).",
            fix=_tokenizer_fix(why),
        )
    summary["caption_tokens"] = {
        "counted_with": "approximation" if approx else str(tokenizer_path),
        "max": max(counts, default=0),
        "over_77": len(long_),
    }
    freq = scan.tag_frequency()
    if freq:
        top = sorted(freq.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TAGS]
        bag.add(
            "tag_frequency",
            count=len(freq),
            message=f"{len(freq)} distinct caption tags; most frequent: "
            + ", ".join(f"{t} ({c})" for t, c in top[:10]),
            data={"tags": dict(top), "distinct": len(freq)},
        )
        summary["tag_frequency"] = dict(top)


def run_image_checks(
    root: Path,
    *,
    resolution: int = 512,
    batch_size: int = 1,
    tokenizer_path: Path | None = None,
    trigger_word: str | None = None,
    deep: bool = False,
    metadata_path: Path | None = None,
    caption_extensions: tuple[str, ...] | list[str] = DEFAULT_CAPTION_EXTENSIONS,
    workers: int | None = None,
    trust_remote_code: bool = False,
    reg_data_dir: Path | None = None,
    mask_dir: Path | None = None,
    alpha_mask: bool = False,
) -> Report:
    """All image dataset checks (layout, captions, files, duplicates, masks) for the folder ``root``, and
    for the regularization folder ``reg_data_dir`` when given."""
    start = time.perf_counter()
    root = Path(root)
    if not root.is_dir():
        return _unusable(root, "image", "path_not_found" if not root.exists() else "not_a_dataset")
    scan = scan_image_dataset(
        root,
        metadata_path=metadata_path,
        caption_extensions=tuple(caption_extensions),
        trigger_word=trigger_word,
    )
    bag = FindingBag()
    bag.extend(scan.findings)
    if not scan.items:
        return Report(
            findings=bag.to_list(), summary={"images": 0}, task="image", path=str(root), unusable=True
        )
    n_workers = workers or _default_workers()
    results = _inspect_all(scan, deep, n_workers)
    _file_findings(scan, results, resolution, bag)
    summary: dict[str, object] = {}
    summary.update(_duplicate_findings(scan, results, deep, bag, n_workers))
    _caption_findings(scan, tokenizer_path, bag, summary, trust_remote_code)
    bag.extend(mask_findings(scan, Path(mask_dir) if mask_dir else None, alpha_mask))
    reg_summary = {}
    if reg_data_dir is not None:
        reg_summary = _reg_findings(
            scan, Path(reg_data_dir), bag, resolution, batch_size, caption_extensions, alpha_mask, n_workers
        )
    elapsed = time.perf_counter() - start
    sources = Counter(item.caption_source or "none" for item in scan.items)
    summary = {
        "images": scan.n_images,
        "images_x_repeats": scan.n_samples,
        "batch_size": batch_size,
        "steps_per_epoch": scan.steps_per_epoch(batch_size),
        **reg_summary,
        "resolution": resolution,
        "captioned": sum(1 for item in scan.items if item.caption),
        "caption_sources": dict(sources),
        "subsets": {s.name: {"repeats": s.repeats, "images": s.n_images} for s in scan.subsets.values()},
        "bytes": sum(r.size_bytes for r in results),
        "mode": "deep" if deep else "default",
        **summary,
        "elapsed_s": round(elapsed, 3),
        "files_per_s": round(len(results) / elapsed, 1) if elapsed > 0 else None,
    }
    return Report(findings=bag.to_list(), summary=summary, task="image", path=str(root))


def _reg_findings(
    scan: ImageDatasetScan,
    reg_root: Path,
    bag: FindingBag,
    resolution: int,
    batch_size: int,
    caption_extensions: tuple[str, ...] | list[str],
    alpha_mask: bool,
    workers: int,
) -> dict[str, object]:
    """Check the regularization folder like a training folder; its findings' examples are prefixed with it.

    Returns the summary entries that change with it (samples and steps per epoch, kohya's balancing)."""
    reg = run_image_checks(
        reg_root,
        resolution=resolution,
        batch_size=batch_size,
        caption_extensions=caption_extensions,
        alpha_mask=alpha_mask,
        workers=workers,
    )
    prefixed = []
    for finding in reg.findings:
        if finding.code == "tag_frequency":
            continue
        examples = [Example(str(reg_root / e.path), e.line, e.detail) for e in finding.examples]
        prefixed.append(replace(finding, examples=examples))
    bag.extend(prefixed)
    if reg.unusable:
        return {"reg_images": 0}
    reg_scan = scan_image_dataset(reg_root, caption_extensions=tuple(caption_extensions))
    counts = sample_counts(scan, reg_scan, batch_size)
    bag.add(
        "reg_images",
        Example(
            str(reg_root),
            None,
            f"{counts.reg_images} images, {counts.reg_samples} samples per epoch beside "
            f"{counts.train_samples} training samples",
        ),
    )
    if counts.reg_images_used < counts.reg_images:
        bag.add(
            "reg_images_unused",
            Example(
                str(reg_root), None, f"{counts.reg_images - counts.reg_images_used} of {counts.reg_images}"
            ),
        )
    return {
        "reg_images": counts.reg_images,
        "reg_samples": counts.reg_samples,
        "samples_per_epoch": counts.samples_per_epoch,
        "steps_per_epoch": counts.steps_per_epoch,
    }


# --- text ---------------------------------------------------------------------------------------


def _percentile(sorted_values: list[int], q: float) -> int:
    if not sorted_values:
        return 0
    k = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return sorted_values[k]


def _length_findings(
    bag: FindingBag,
    counts: list[int],
    places: list[tuple[str, int]],
    tokenizer_path: Path | None,
    approx: bool,
    max_seq_len: int | None,
    why: str,
) -> tuple[dict[str, object], int]:
    """Token length statistics and the records over max_seq_len; returns (stats, records over)."""
    ordered = sorted(counts)
    stats: dict[str, object] = {
        "counted_with": "approximation" if approx else str(tokenizer_path),
        "min": ordered[0] if ordered else 0,
        "p50": _percentile(ordered, 0.5),
        "p90": _percentile(ordered, 0.9),
        "p99": _percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else 0,
        "mean": round(statistics.fmean(ordered), 1) if ordered else 0,
        "total": sum(ordered),
    }
    if ordered:
        how = TEXT_APPROXIMATION if approx else f"counted with the tokenizer in {tokenizer_path}"
        bag.add(
            "token_lengths",
            count=len(ordered),
            message=(
                f"Tokens per record: min {stats['min']}, median {stats['p50']}, p90 {stats['p90']}, "
                f"p99 {stats['p99']}, max {stats['max']} ({how})."
            ),
            data=stats,
        )
    over = 0
    if max_seq_len:
        for (file, line), n in zip(places, counts, strict=True):
            if n > max_seq_len:
                over += 1
                bag.add("exceeds_max_seq_len", Example(file, line, f"{'~' if approx else ''}{n} tokens"))
        if over:
            bag.add(
                "exceeds_max_seq_len",
                count=0,
                message=f"{over} of {len(counts)} records are longer than max_seq_len={max_seq_len} tokens; "
                "training truncates them.",
            )
    if approx and ordered:
        why = why or "no --config with a local base model folder"
        bag.add(
            "tokenizer_unavailable",
            message=f"Token lengths are an {TEXT_APPROXIMATION} ({why}).",
            fix=_tokenizer_fix(why),
        )
    return stats, over


def run_text_checks(
    path: Path,
    *,
    tokenizer_path: Path | None = None,
    max_seq_len: int | None = None,
    trust_remote_code: bool = False,
) -> Report:
    """All text dataset checks (parsing, formats, duplicates, token lengths) for a file or folder."""
    path = Path(path)
    if not path.exists():
        return _unusable(path, "text", "path_not_found")
    scan = read_text_dataset(path)
    bag = FindingBag()
    bag.extend(scan.findings)
    if not scan.files:
        return _unusable(path, "text", "not_a_dataset", "no .jsonl or .json files", bag)
    if scan.total_bytes == 0:
        return _unusable(path, "text", "not_a_dataset", "all files are empty", bag)
    for file, counts in scan.formats.items():
        fmt = scan.format_of(file)
        if fmt is not None:
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            bag.add("detected_format", Example(file, None, f"{fmt} ({detail})"), data=scan.formats)
    tokenizer, why = (
        (None, "")
        if tokenizer_path is None
        else load_local_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    )
    counts = text_token_counts(scan.records, tokenizer)
    places = [(rec.file, rec.line) for rec in scan.records]
    stats, over = _length_findings(bag, counts, places, tokenizer_path, tokenizer is None, max_seq_len, why)
    summary = {
        "files": len(scan.files),
        "records": len(scan.records),
        "formats": scan.formats,
        "tokens": stats,
        "max_seq_len": max_seq_len,
        "over_max_seq_len": over,
    }
    return Report(findings=bag.to_list(), summary=summary, task="text", path=str(path))


# --- preference pairs -------------------------------------------------------------------------------------


def _pair_token_counts(records: list[PreferenceRecord], tokenizer: Any | None) -> list[int]:
    """Per record: the longer of prompt + chosen and prompt + rejected (the one answer of an unpaired record),
    in tokens."""
    sides = [
        (i, TextRecord(r.file, r.line, "chat", [*r.prompt, *answer]))
        for i, r in enumerate(records)
        for answer, _ in r.answers()
    ]
    counts = text_token_counts([side for _, side in sides], tokenizer)
    longest = [0] * len(records)
    for (i, _), n in zip(sides, counts, strict=True):
        longest[i] = max(longest[i], n)
    return longest


def run_preference_checks(
    path: Path,
    *,
    tokenizer_path: Path | None = None,
    max_seq_len: int | None = None,
    trust_remote_code: bool = False,
    paired: bool = True,
) -> Report:
    """All preference dataset checks (pairs, formats, duplicates, token lengths) for a file or folder.
    `paired=False` (KTO, task "kto") also accepts unpaired prompt/completion/label records."""
    from loratui.data.preference_dataset import read_preference_dataset

    path = Path(path)
    task = "preference" if paired else "kto"
    if not path.exists():
        return _unusable(path, task, "path_not_found")
    scan = read_preference_dataset(path, paired=paired)
    bag = FindingBag()
    bag.extend(scan.findings)
    if not scan.files:
        return _unusable(path, task, "not_a_dataset", "no .jsonl or .json files", bag)
    if scan.total_bytes == 0:
        return _unusable(path, task, "not_a_dataset", "all files are empty", bag)
    for file, counts in scan.formats.items():
        if counts:
            fmt = next(iter(counts)) if len(counts) == 1 else "mixed"
            detail = ", ".join(f"{k}: {v}" for k, v in counts.items())
            bag.add("detected_format", Example(file, None, f"{fmt} ({detail})"), data=scan.formats)
    tokenizer, why = (
        (None, "")
        if tokenizer_path is None
        else load_local_tokenizer(tokenizer_path, trust_remote_code=trust_remote_code)
    )
    counts = _pair_token_counts(scan.records, tokenizer)
    places = [(rec.file, rec.line) for rec in scan.records]
    stats, over = _length_findings(bag, counts, places, tokenizer_path, tokenizer is None, max_seq_len, why)
    summary = {
        "files": len(scan.files),
        "pairs": len(scan.records),
        "formats": scan.formats,
        "tokens": stats,
        "max_seq_len": max_seq_len,
        "over_max_seq_len": over,
    }
    return Report(findings=bag.to_list(), summary=summary, task=task, path=str(path))
