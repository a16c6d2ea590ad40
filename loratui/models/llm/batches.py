"""LLM training data: read (with `loratui.data.text_dataset`, the same reader as `loratui check`), tokenize with
loss masks, truncate, split off a validation set, pack, and collate micro-batches.

Bad input rule: records the reader rejects (broken JSON lines, missing fields, empty responses, non-UTF-8
lines) are reported by `loratui check` as errors, and `loratui train` refuses to start on them unless
`--skip-checks`. When the trainer is reached anyway it skips exactly those records and records a warning
that names how many and where (file:line). Records the chat template cannot render are skipped the same way.
A dataset with nothing left to train on, or whose every sample is longer than `max_seq_len`, is an error.
"""

from __future__ import annotations

import bisect
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.data.text_dataset import read_text_dataset
from loratui.models.llm.chat import IGNORE_INDEX, Encoded, TemplateProblem, encode_record

MAX_LISTED = 5


class LLMDataError(ValueError):
    """The dataset cannot be trained on; the message says why and what to change."""


@dataclass
class Unit:
    """One row of a micro-batch: a sample, or several packed samples (then `position_ids` restart per sample)."""

    input_ids: list[int]
    labels: list[int]
    num_targets: int
    num_samples: int = 1
    position_ids: list[int] | None = None


@dataclass
class LLMData:
    """Tokenized train/validation units plus what happened on the way (for events)."""

    train: list[Unit]
    val: list[Unit]
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)

    def target_tokens(self, indices: list[int]) -> int:
        """Target tokens of the given train units: the loss normaliser of one optimizer step."""
        return sum(self.train[i].num_targets for i in indices)


def _where(items: list[tuple[str, int | None, str]]) -> str:
    shown = [
        (f"{file}:{line}" if line is not None else file) + (f" ({detail})" if detail else "")
        for file, line, detail in items[:MAX_LISTED]
    ]
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "; ".join(shown) + more


def _reader_findings(scan) -> tuple[int, list[tuple[str, int | None, str]], list[str]]:
    """(records skipped, where, notes): errors are skipped records; warnings become notes."""
    skipped, where, notes = 0, [], []
    for finding in scan.findings:
        examples = [(e.path, e.line, finding.code) for e in finding.examples]
        if finding.severity == "error":
            skipped += finding.count
            where += examples
        elif finding.severity == "warning":
            notes.append(f"{finding.message} ({finding.count}): {_where(examples)}")
    return skipped, where, notes


def encode_dataset(
    path: str | Path, tokenizer: Any, template: str, *, train_on_prompt: bool
) -> tuple[list[Encoded], list[str]]:
    """Read and encode every usable record; returns (encoded samples, warnings about skipped records)."""
    path = Path(path)
    try:
        scan = read_text_dataset(path)
    except FileNotFoundError as exc:
        raise LLMDataError(str(exc)) from exc
    skipped, rejected, warnings = _reader_findings(scan)
    if skipped:
        warnings.insert(
            0,
            f"skipped {skipped} unusable record(s) in {path} (see `loratui check {path}`): {_where(rejected)}",
        )
    encoded: list[Encoded] = []
    unrenderable: list[tuple[str, int | None, str]] = []
    for record in scan.records:
        try:
            encoded.append(encode_record(record, tokenizer, template, train_on_prompt=train_on_prompt))
        except TemplateProblem as exc:
            unrenderable.append((record.file, record.line, str(exc)[:120]))
    if unrenderable:
        warnings.append(
            f"skipped {len(unrenderable)} record(s) the chat template rejects: {_where(unrenderable)}"
        )
    if not encoded:
        found = f"{len(scan.files)} file(s)" if scan.files else "no .jsonl/.json files"
        detail = f"; problems: {_where(rejected)}" if rejected else ""
        raise LLMDataError(f"no usable training records in {path} ({found}){detail}")
    return encoded, warnings


def truncate(samples: list[Encoded], max_seq_len: int) -> tuple[list[Encoded], list[str], dict[str, Any]]:
    """Cut samples to `max_seq_len` tokens; drop those left without targets. Raises when every sample is
    longer than `max_seq_len`."""
    lengths = [len(s.input_ids) for s in samples]
    cut = [n for n in lengths if n > max_seq_len]
    stats = {"samples": len(samples), "truncated": len(cut), "max_tokens": max(lengths)}
    if len(cut) == len(samples):
        raise LLMDataError(
            f"every sample ({len(samples)}) is longer than max_seq_len={max_seq_len} tokens (shortest "
            f"{min(lengths)}, median {int(statistics.median(lengths))}); raise max_seq_len to at least "
            f"{int(statistics.median(lengths))} or shorten/split the samples"
        )
    kept: list[Encoded] = []
    for sample in samples:
        item = Encoded(sample.input_ids[:max_seq_len], sample.labels[:max_seq_len])
        if item.num_targets:
            kept.append(item)
    warnings = []
    if cut:
        warnings.append(
            f"{len(cut)} of {len(samples)} samples are longer than max_seq_len={max_seq_len} tokens and were cut "
            f"(longest {max(cut)}); raise max_seq_len or shorten them"
        )
    dropped = len(samples) - len(kept)
    if dropped:
        warnings.append(f"{dropped} sample(s) had no answer tokens left after cutting and are not trained on")
        stats["dropped"] = dropped
    if not kept:
        raise LLMDataError(f"no sample has answer tokens within max_seq_len={max_seq_len}; raise max_seq_len")
    return kept, warnings, stats


def split_validation(
    samples: list[Encoded], fraction: float, seed: int
) -> tuple[list[Encoded], list[Encoded]]:
    """(train, val): a seeded random `fraction` of the samples (at least one) held out."""
    if fraction <= 0:
        return samples, []
    import torch

    from loratui.util.seeding import mix_seed

    n_val = max(1, round(len(samples) * fraction))
    if n_val >= len(samples):
        raise LLMDataError(f"val_split={fraction} leaves no training samples out of {len(samples)}")
    order = torch.randperm(
        len(samples), generator=torch.Generator().manual_seed(mix_seed(seed, "val"))
    ).tolist()
    held = set(order[:n_val])
    train = [s for i, s in enumerate(samples) if i not in held]
    val = [s for i, s in enumerate(samples) if i in held]
    return train, val


def as_units(samples: list[Encoded]) -> list[Unit]:
    return [Unit(s.input_ids, s.labels, s.num_targets) for s in samples]


def pack(samples: list[Encoded], max_seq_len: int) -> list[Unit]:
    """Best-fit-decreasing packing into rows of at most `max_seq_len` tokens (deterministic).

    Each sample keeps its own positions (0..n-1), so attention does not cross sample boundaries:
    transformers builds a block-diagonal causal mask from restarting `position_ids` when no 2D attention
    mask is given, and every sample's first token is never a target.
    """
    order = sorted(range(len(samples)), key=lambda i: (-len(samples[i].input_ids), i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted
    for index in order:
        size = len(samples[index].input_ids)
        at = bisect.bisect_left(free, (size, -1))
        if at < len(free):
            remaining, bin_id = free.pop(at)
        else:
            remaining, bin_id = max_seq_len, len(bins)
            bins.append([])
        bins[bin_id].append(index)
        bisect.insort(free, (remaining - size, bin_id))
    units = []
    for members in bins:
        ids, labels, positions = [], [], []
        for index in sorted(members):
            ids += samples[index].input_ids
            labels += samples[index].labels
            positions += list(range(len(samples[index].input_ids)))
        units.append(Unit(ids, labels, sum(samples[i].num_targets for i in members), len(members), positions))
    return units


def build_llm_data(
    path: str | Path,
    tokenizer: Any,
    template: str,
    *,
    max_seq_len: int,
    train_on_prompt: bool = False,
    packing: bool = False,
    val_split: float = 0.0,
    seed: int = 0,
) -> LLMData:
    """Everything the trainer needs from the dataset."""
    encoded, warnings = encode_dataset(path, tokenizer, template, train_on_prompt=train_on_prompt)
    kept, cut_warnings, stats = truncate(encoded, max_seq_len)
    train, val = split_validation(kept, val_split, seed)
    units = pack(train, max_seq_len) if packing else as_units(train)
    stats.update(
        train_samples=len(train),
        val_samples=len(val),
        train_rows=len(units),
        target_tokens=sum(u.num_targets for u in units),
        tokens=sum(len(u.input_ids) for u in units),
    )
    return LLMData(units, as_units(val), warnings + cut_warnings, stats)


@dataclass
class Batch:
    """Tensors for one forward pass."""

    input_ids: Any
    labels: Any
    attention_mask: Any | None
    position_ids: Any | None
    num_targets: int
    num_tokens: int

    def to(self, device: Any) -> Batch:
        def move(tensor: Any) -> Any:
            return tensor.to(device, non_blocking=True) if tensor is not None else None

        return Batch(
            move(self.input_ids),
            move(self.labels),
            move(self.attention_mask),
            move(self.position_ids),
            self.num_targets,
            self.num_tokens,
        )


def collate(units: list[Unit], pad_id: int) -> Batch:
    """Right-pad units to the longest one. Unpacked rows get an attention mask; packed rows get
    `position_ids` (padding forms its own segment) and no mask, which keeps packed samples apart."""
    import torch

    width = max(len(u.input_ids) for u in units)
    packed = any(u.position_ids is not None for u in units)
    ids = torch.full((len(units), width), pad_id, dtype=torch.long)
    labels = torch.full((len(units), width), IGNORE_INDEX, dtype=torch.long)
    mask = None if packed else torch.zeros((len(units), width), dtype=torch.long)
    positions = torch.zeros((len(units), width), dtype=torch.long) if packed else None
    for row, unit in enumerate(units):
        n = len(unit.input_ids)
        ids[row, :n] = torch.tensor(unit.input_ids)
        labels[row, :n] = torch.tensor(unit.labels)
        if mask is not None:
            mask[row, :n] = 1
        if positions is not None:
            own = unit.position_ids or list(range(n))
            positions[row, :n] = torch.tensor(own)
            positions[row, n:] = torch.arange(width - n)
    return Batch(
        ids, labels, mask, positions, sum(u.num_targets for u in units), sum(len(u.input_ids) for u in units)
    )
