"""Preference (DPO/ORPO) dataset parsing: each record is a prompt with a chosen and a rejected answer.

``loratui check --task preference`` and the preference trainer both read through
``read_preference_dataset``, so what the check accepts is what training reads. Files are read as for
``loratui.data.text_dataset`` (JSONL, JSON arrays, folders of both; 1-based line numbers).

Formats, detected per record (first match wins):

=======================  ===============================================================================
``sharegpt_pair``        LLaMA-Factory: ``{"conversations": [{"from": "human", "value": ...}, ...],
                         "chosen": {"from": "gpt", "value": ...}, "rejected": {...}}``; also with
                         ``messages`` (role/content turns) instead of ``conversations``; optional ``system``
``messages_pair``        TRL conversational: ``{"prompt": [messages], "chosen": [messages],
                         "rejected": [messages]}`` (answers are assistant turns)
``implicit_messages``    TRL implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, both whole
                         conversations; the prompt is the turns they share, the answers are what follows
``prompt_pair``          ``{"prompt": str, "chosen": str, "rejected": str}``; ``question`` or
                         ``instruction`` (+ ``input``, alpaca style) in place of ``prompt``; optional
                         ``system``
``unpaired``             TRL's unpaired preference (KTO): ``{"prompt": str | [messages], "completion": str |
                         [messages], "label": true | false}``: one answer, desirable or not
=======================  ===============================================================================

An unpaired record has only a chosen (``label: true``) or only a rejected answer; it is read only with
``paired=False`` (KTO), else it is an ``unpaired_record`` error.

Public API: ``read_preference_dataset(path) -> PreferenceScan``, ``PreferenceRecord``,
``normalise_preference(obj)`` (raises ``RecordError``), ``detect_preference(path)``, ``PREFERENCE_FORMATS``.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.data.findings import Example, Finding, FindingBag
from loratui.data.text_dataset import (
    _CHAT_ROLES,
    _SHAREGPT_ROLES,
    Message,
    RecordError,
    _content,
    _turns,
    dataset_files,
    json_values,
    list_dataset_files,
    note_file_shape,
    note_repeat,
    read_files,
)

PREFERENCE_FORMATS = ("sharegpt_pair", "messages_pair", "implicit_messages", "prompt_pair", "unpaired")
PROMPT_KEYS = ("prompt", "question", "instruction")


@dataclass
class PreferenceRecord:
    """One pair: the prompt turns (ending with a user turn) and the chosen/rejected answer turns (an unpaired
    record has one of them empty)."""

    file: str
    line: int
    fmt: str
    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]

    @property
    def paired(self) -> bool:
        return bool(self.chosen) and bool(self.rejected)

    def answers(self) -> list[tuple[list[Message], bool]]:
        """(answer turns, desirable) of each answer the record has."""
        return [(self.chosen, True)] * bool(self.chosen) + [(self.rejected, False)] * bool(self.rejected)

    def plain_texts(self) -> tuple[str, str]:
        """(prompt + chosen, prompt + rejected) as plain text (approximate token counts)."""
        head = "\n".join(m.content for m in self.prompt)
        return (
            head + "\n" + "\n".join(m.content for m in self.chosen),
            head + "\n" + "\n".join(m.content for m in self.rejected),
        )


@dataclass
class PreferenceScan:
    """What ``read_preference_dataset`` found."""

    root: Path
    files: list[Path]
    records: list[PreferenceRecord]
    findings: list[Finding]
    formats: dict[str, dict[str, int]] = field(default_factory=dict)
    total_bytes: int = 0

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)


# --- one record ------------------------------------------------------------------------------------------


def _answer(value: Any, key: str, fmt: str) -> list[Message]:
    """An answer: a string, one message object, or a list of messages (assistant turns)."""
    if isinstance(value, str):
        messages = [Message("assistant", value)]
    elif isinstance(value, dict):
        messages = _turns([value], key, fmt, _SHAREGPT_ROLES, "from", "value")
    elif isinstance(value, list):
        messages = _turns(value, key, fmt, _CHAT_ROLES, "role", "content")
    else:
        kind = "missing" if value is None else type(value).__name__
        raise RecordError("missing_fields", f"{key!r} is {kind}, expected a string or messages", fmt)
    if not messages or any(m.role != "assistant" for m in messages):
        raise RecordError("bad_role", f"{key!r} must hold assistant turns only", fmt)
    if not any(m.content.strip() for m in messages):
        raise RecordError("empty_response", f"{key!r} is empty", fmt)
    return messages


def _system(obj: dict[str, Any], fmt: str) -> list[Message]:
    system = obj.get("system")
    if system is None:
        return []
    if not isinstance(system, str):
        raise RecordError("missing_fields", f"'system' is {type(system).__name__}, expected a string", fmt)
    return [Message("system", system)] if system.strip() else []


def _check_prompt(prompt: list[Message], fmt: str) -> list[Message]:
    if not prompt or prompt[-1].role != "user":
        raise RecordError("missing_fields", "the prompt must end with a user turn", fmt)
    if not prompt[-1].content.strip():
        raise RecordError("missing_fields", "the prompt is empty", fmt)
    return prompt


def _text_prompt(obj: dict[str, Any], fmt: str) -> list[Message]:
    key = next((k for k in PROMPT_KEYS if k in obj), None)
    if key is None:
        raise RecordError("missing_fields", "no 'prompt' (or 'question'/'instruction') field", fmt)
    text = _content(obj[key], key, fmt)
    extra = obj.get("input") if key == "instruction" else None
    if isinstance(extra, str) and extra.strip():
        text = text + "\n\n" + extra
    return [Message("user", text)]


def _implicit(obj: dict[str, Any], fmt: str) -> tuple[list[Message], list[Message], list[Message]]:
    chosen = _turns(obj["chosen"], "chosen", fmt, _CHAT_ROLES, "role", "content")
    rejected = _turns(obj["rejected"], "rejected", fmt, _CHAT_ROLES, "role", "content")
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1].role != "user":  # the answers start after the last shared user turn
        shared -= 1
    if not shared:
        raise RecordError(
            "pair_prompt_mismatch", "'chosen' and 'rejected' do not start with the same user turn", fmt
        )
    prompt = chosen[:shared]
    return (
        prompt,
        _answer_turns(chosen[shared:], "chosen", fmt),
        _answer_turns(rejected[shared:], "rejected", fmt),
    )


def _answer_turns(messages: list[Message], key: str, fmt: str) -> list[Message]:
    if not messages:
        raise RecordError("empty_response", f"{key!r} has no answer after the prompt", fmt)
    if any(m.role != "assistant" for m in messages):
        raise RecordError(
            "pair_prompt_mismatch", f"{key!r} goes on with a {messages[-1].role} turn after the prompt", fmt
        )
    if not any(m.content.strip() for m in messages):
        raise RecordError("empty_response", f"{key!r} is empty", fmt)
    return messages


def normalise_preference(obj: Any) -> tuple[str, list[Message], list[Message], list[Message]]:
    """(format, prompt, chosen, rejected) of one parsed JSON value. Raises ``RecordError``."""
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"a JSON {type(obj).__name__}, expected an object")
    if "completion" in obj and "label" in obj and "chosen" not in obj and "rejected" not in obj:
        return _unpaired(obj)
    if "chosen" not in obj or "rejected" not in obj:
        missing = " and ".join(k for k in ("chosen", "rejected") if k not in obj)
        keys = ", ".join(list(obj)[:8]) or "no keys"
        raise RecordError("not_a_preference_record", f"no {missing} (keys: {keys})")
    history_key = "conversations" if "conversations" in obj else "messages" if "messages" in obj else None
    if history_key is not None:
        fmt = "sharegpt_pair"
        roles = _SHAREGPT_ROLES if history_key == "conversations" else _CHAT_ROLES
        text_key = "value" if history_key == "conversations" else "content"
        role_key = "from" if history_key == "conversations" else "role"
        prompt = _system(obj, fmt) + _turns(obj[history_key], history_key, fmt, roles, role_key, text_key)
        return (
            fmt,
            _check_prompt(prompt, fmt),
            _answer(obj["chosen"], "chosen", fmt),
            _answer(obj["rejected"], "rejected", fmt),
        )
    if isinstance(obj.get("prompt"), list):
        fmt = "messages_pair"
        prompt = _turns(obj["prompt"], "prompt", fmt, _CHAT_ROLES, "role", "content")
        return (
            fmt,
            _check_prompt(_system(obj, fmt) + prompt, fmt),
            _answer(obj["chosen"], "chosen", fmt),
            _answer(obj["rejected"], "rejected", fmt),
        )
    if not any(k in obj for k in PROMPT_KEYS) and isinstance(obj["chosen"], list):
        fmt = "implicit_messages"
        prompt, chosen, rejected = _implicit(obj, fmt)
        return fmt, _check_prompt(_system(obj, fmt) + prompt, fmt), chosen, rejected
    fmt = "prompt_pair"
    prompt = _system(obj, fmt) + _text_prompt(obj, fmt)
    return (
        fmt,
        _check_prompt(prompt, fmt),
        _answer(obj["chosen"], "chosen", fmt),
        _answer(obj["rejected"], "rejected", fmt),
    )


def _unpaired(obj: dict[str, Any]) -> tuple[str, list[Message], list[Message], list[Message]]:
    fmt = "unpaired"
    label = obj["label"]
    if not isinstance(label, bool):
        raise RecordError("missing_fields", f"'label' is {type(label).__name__}, expected true or false", fmt)
    if isinstance(obj.get("prompt"), list):
        prompt = _turns(obj["prompt"], "prompt", fmt, _CHAT_ROLES, "role", "content")
    else:
        prompt = _text_prompt(obj, fmt)
    answer = _answer(obj["completion"], "completion", fmt)
    prompt = _check_prompt(_system(obj, fmt) + prompt, fmt)
    return fmt, prompt, answer if label else [], [] if label else answer


# --- files -------------------------------------------------------------------------------------------------


def _key(prompt: list[Message], chosen: list[Message], rejected: list[Message]) -> bytes:
    payload = json.dumps([[[m.role, m.content] for m in part] for part in (prompt, chosen, rejected)])
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).digest()


def read_preference_dataset(path: Path, *, paired: bool = True) -> PreferenceScan:
    """Read and normalise every pair of a .jsonl/.json file or folder; problems become findings.

    `paired` (DPO, ORPO): an unpaired record (one labelled completion) is an `unpaired_record` error; without
    it (KTO) unpaired records are read too."""
    root, files = dataset_files(path)
    bag = FindingBag()
    records: list[PreferenceRecord] = []
    formats: dict[str, dict[str, int]] = {}
    seen: dict[bytes, tuple[str, int]] = {}
    total_bytes = 0
    for file, label, data in read_files(root, files, bag):
        total_bytes += len(data.strip())
        counts: Counter[str] = Counter()
        for line, obj in json_values(file, data, label, bag):
            try:
                fmt, prompt, chosen, rejected = normalise_preference(obj)
            except RecordError as err:
                bag.add(err.code, Example(label, line, err.detail + (f" ({err.fmt})" if err.fmt else "")))
                continue
            if paired and not (chosen and rejected):
                bag.add("unpaired_record", Example(label, line, "one labelled completion, no pair"))
                continue
            counts[fmt] += 1
            if chosen == rejected:
                bag.add("identical_pair", Example(label, line, "chosen and rejected are the same"))
            note_repeat(seen, _key(prompt, chosen, rejected), label, line, bag)
            records.append(PreferenceRecord(label, line, fmt, prompt, chosen, rejected))
        formats[label] = dict(counts.most_common())
        note_file_shape(label, data, counts, bag)
    return PreferenceScan(root, files, records, bag.to_list(), formats, total_bytes)


def detect_preference(path: Path) -> str | None:
    """From the first record of the first dataset file: "preference" (`chosen` and `rejected` keys), "kto"
    (`completion` and `label`: an unpaired record) or None."""
    path = Path(path)
    if not path.exists():
        return None
    for file in list_dataset_files(path)[:1]:
        try:
            with file.open("rb") as handle:
                head = handle.read(1 << 16)
        except OSError:
            return None
        probe = FindingBag()
        text = head.split(b"\n", 1)[0] if file.suffix.lower() == ".jsonl" else head
        values = json_values(file, text, file.name, probe)
        first = values[0][1] if values else None
        keys = set(first) if isinstance(first, dict) else set()
        if {"chosen", "rejected"} <= keys:
            return "preference"
        return "kto" if {"completion", "label"} <= keys else None
    return None
