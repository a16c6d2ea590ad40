"""Preference training data: each pair rendered with the chat template into prompt + chosen and
prompt + rejected token sequences, the prompt tokens masked from the loss.

Read with `loratui.data.preference_dataset` (the same reader as `loratui check --task preference`); records
the reader rejects are skipped with a warning naming where (as for SFT data, see
`loratui.models.llm.batches`). The prompt is rendered with the generation prompt (`add_generation_prompt`),
and every token that starts after it is a target, so both answers are scored after exactly the same prompt
tokens. Each side is cut to `max_seq_len`; a pair left without targets on either side is dropped. Pairs are
never packed, and no validation pairs are held out.

KTO (`build_kto_data`) reads single answers labelled desirable or not (a pair gives one of each); each example
also carries its prompt with the next example's answer, for the KL estimate.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.data.preference_dataset import PreferenceRecord, read_preference_dataset
from loratui.models.llm.batches import MAX_LISTED, LLMData, LLMDataError, Unit
from loratui.models.llm.chat import IGNORE_INDEX, TemplateProblem, _tokenize_with_offsets, render


@dataclass
class Pair:
    """One training row of a preference run: the chosen and the rejected sequence of one prompt."""

    chosen: Unit
    rejected: Unit
    num_samples: int = 1

    @property
    def num_targets(self) -> int:
        return self.chosen.num_targets + self.rejected.num_targets

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' tokens (token counts of the events)."""
        return self.chosen.input_ids + self.rejected.input_ids


class PreferenceData(LLMData):
    """`LLMData` whose rows are `Pair`s (`train[i]` is pair i; a micro-batch takes whole pairs)."""

    def cut(self, max_seq_len: int) -> None:
        """Cut both sides of every pair to `max_seq_len` tokens in place (the OOM ladder's max_seq_len rung)."""
        self.train[:] = [Pair(_cut(p.chosen, max_seq_len), _cut(p.rejected, max_seq_len)) for p in self.train]


@dataclass
class KtoExample:
    """One training row of a KTO run: an answer labelled desirable or not, and the same prompt with another
    example's answer (`mismatched`, for the KL estimate)."""

    own: Unit
    mismatched: Unit
    desirable: bool
    num_samples: int = 1

    @property
    def num_targets(self) -> int:
        return self.own.num_targets

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' tokens (token counts of the events)."""
        return self.own.input_ids + self.mismatched.input_ids


class KtoData(PreferenceData):
    """`LLMData` whose rows are `KtoExample`s."""

    def cut(self, max_seq_len: int) -> None:
        self.train[:] = [
            KtoExample(_cut(e.own, max_seq_len), _cut(e.mismatched, max_seq_len), e.desirable)
            for e in self.train
        ]


def _cut(unit: Unit, max_seq_len: int) -> Unit:
    if len(unit.input_ids) <= max_seq_len:
        return unit
    labels = unit.labels[:max_seq_len]
    targets = sum(1 for label in labels if label != IGNORE_INDEX)
    return Unit(unit.input_ids[:max_seq_len], labels, targets)


def encode_side(tokenizer: Any, template: str, prompt: list[Any], answer: list[Any]) -> Unit:
    """Tokens and labels of prompt + answer; only tokens after the rendered prompt are targets."""
    prefix = render(tokenizer, template, prompt, generation_prompt=True)
    full = render(tokenizer, template, [*prompt, *answer])
    if not full.startswith(prefix):
        raise TemplateProblem("the chat template renders the prompt differently before an answer")
    ids, offsets = _tokenize_with_offsets(tokenizer, full, False)
    boundary = len(prefix)
    labels = [
        tok if end > start and start >= boundary else IGNORE_INDEX
        for tok, (start, end) in zip(ids, offsets, strict=True)
    ]
    eos_id = tokenizer.eos_token_id
    if eos_id is not None and eos_id not in [t for t in labels if t != IGNORE_INDEX][-3:]:
        ids.append(eos_id)
        labels.append(eos_id)
    if labels:
        labels[0] = IGNORE_INDEX
    return Unit(ids, labels, sum(1 for label in labels if label != IGNORE_INDEX))


def encode_pair(record: PreferenceRecord, tokenizer: Any, template: str) -> Pair:
    """Both sides of one record. Raises `TemplateProblem`."""
    return Pair(
        encode_side(tokenizer, template, record.prompt, record.chosen),
        encode_side(tokenizer, template, record.prompt, record.rejected),
    )


def _where(items: list[tuple[str, int | None, str]]) -> str:
    shown = [
        f"{file}:{line}" + (f" ({detail})" if detail else "") for file, line, detail in items[:MAX_LISTED]
    ]
    more = f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "; ".join(shown) + more


def build_kto_data(path: str | Path, tokenizer: Any, template: str, *, max_seq_len: int) -> KtoData:
    """KTO examples: every answer of every record (a pair gives a desirable and an undesirable example, as TRL
    unpairs them), each with the answer of the next example (in dataset order, wrapping) for the KL estimate."""
    path = Path(path)
    try:
        scan = read_preference_dataset(path, paired=False)
    except FileNotFoundError as exc:
        raise LLMDataError(str(exc)) from exc
    warnings = _skipped(scan, path, "kto")
    answers = [(record, answer, good) for record in scan.records for answer, good in record.answers()]
    examples: list[KtoExample] = []
    unrenderable: list[tuple[str, int | None, str]] = []
    for i, (record, answer, good) in enumerate(answers):
        other = answers[(i + 1) % len(answers)][1]
        try:
            own = encode_side(tokenizer, template, record.prompt, answer)
            mismatched = encode_side(tokenizer, template, record.prompt, other)
        except TemplateProblem as exc:
            unrenderable.append((record.file, record.line, str(exc)[:120]))
            continue
        examples.append(KtoExample(own, mismatched, good))
    if unrenderable:
        warnings.append(
            f"skipped {len(unrenderable)} answer(s) the chat template rejects: {_where(unrenderable)}"
        )
    if not examples:
        raise LLMDataError(f"no usable KTO examples in {path}")
    data = KtoData(examples, [], warnings)
    longest = max(len(e.own.input_ids) for e in examples)
    cut = sum(1 for e in examples if len(e.own.input_ids) > max_seq_len)
    data.cut(max_seq_len)
    kept = [e for e in data.train if e.own.num_targets]
    if cut:
        warnings.append(
            f"{cut} of {len(examples)} answers are longer than max_seq_len={max_seq_len} tokens with their prompt "
            f"and were cut (longest {longest}); raise max_seq_len or shorten them"
        )
    if not kept:
        raise LLMDataError(f"no answer has tokens within max_seq_len={max_seq_len}; raise max_seq_len")
    data.train[:] = kept
    desirable = sum(e.desirable for e in kept)
    if desirable in (0, len(kept)):
        warnings.append(
            f"every KTO example is {'desirable' if desirable else 'undesirable'}; KTO learns from both"
        )
    data.stats = {
        "samples": len(examples),
        "desirable": desirable,
        "undesirable": len(kept) - desirable,
        "truncated": cut,
        "max_tokens": longest,
        "train_samples": len(kept),
        "val_samples": 0,
        "train_rows": len(kept),
        "target_tokens": sum(e.num_targets for e in kept),
        "tokens": sum(len(e.input_ids) for e in kept),
    }
    return data


def _skipped(scan: Any, path: Path, task: str) -> list[str]:
    """A warning naming the records the reader rejected (none: an empty list)."""
    rejected = [
        (e.path, e.line, finding.code)
        for finding in scan.findings
        if finding.severity == "error"
        for e in finding.examples
    ]
    skipped = sum(f.count for f in scan.findings if f.severity == "error")
    if not skipped:
        return []
    return [
        f"skipped {skipped} unusable record(s) in {path} (see `loratui check {path} --task {task}`): "
        + _where(rejected)
    ]


def build_method_data(
    method: str, path: str | Path, tokenizer: Any, template: str, *, max_seq_len: int
) -> PreferenceData:
    """The training data of a preference method: pairs (dpo, orpo) or KTO examples (kto)."""
    build = build_kto_data if method == "kto" else build_preference_data
    return build(path, tokenizer, template, max_seq_len=max_seq_len)


def build_preference_data(
    path: str | Path, tokenizer: Any, template: str, *, max_seq_len: int
) -> PreferenceData:
    """Everything the preference step needs from the dataset."""
    path = Path(path)
    try:
        scan = read_preference_dataset(path)
    except FileNotFoundError as exc:
        raise LLMDataError(str(exc)) from exc
    warnings = _skipped(scan, path, "preference")
    pairs: list[Pair] = []
    unrenderable: list[tuple[str, int | None, str]] = []
    for record in scan.records:
        try:
            pairs.append(encode_pair(record, tokenizer, template))
        except TemplateProblem as exc:
            unrenderable.append((record.file, record.line, str(exc)[:120]))
    if unrenderable:
        warnings.append(
            f"skipped {len(unrenderable)} pair(s) the chat template rejects: {_where(unrenderable)}"
        )
    if not pairs:
        detail = f"; {warnings[0]}" if warnings else ""
        raise LLMDataError(f"no usable preference pairs in {path}{detail}")
    data = PreferenceData(pairs, [], warnings)
    longest = max(max(len(p.chosen.input_ids), len(p.rejected.input_ids)) for p in pairs)
    cut = sum(1 for p in pairs if max(len(p.chosen.input_ids), len(p.rejected.input_ids)) > max_seq_len)
    data.cut(max_seq_len)
    kept = [p for p in data.train if p.chosen.num_targets and p.rejected.num_targets]
    if cut:
        warnings.append(
            f"{cut} of {len(pairs)} pairs have a side longer than max_seq_len={max_seq_len} tokens and were cut "
            f"(longest {longest}); raise max_seq_len or shorten them"
        )
    if len(kept) < len(pairs):
        warnings.append(
            f"{len(pairs) - len(kept)} pair(s) had no answer tokens left after cutting and are dropped"
        )
    if not kept:
        raise LLMDataError(f"no pair has answer tokens within max_seq_len={max_seq_len}; raise max_seq_len")
    data.train[:] = kept
    data.stats = {
        "samples": len(pairs),
        "pairs": len(kept),
        "truncated": cut,
        "max_tokens": longest,
        "train_samples": len(kept),
        "val_samples": 0,
        "train_rows": len(kept),
        "target_tokens": sum(p.num_targets for p in kept),
        "tokens": sum(len(p.input_ids) for p in kept),
    }
    return data
