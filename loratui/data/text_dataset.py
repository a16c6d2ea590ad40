"""Text (LLM) dataset parsing: JSONL/JSON records normalised to chat messages or plain text.

This is the single source of truth for text datasets: ``loratui check`` and the LLM trainer both read
through ``read_text_dataset``, so what the check accepts is what training reads. Broken records are
skipped with an error finding; the trainer refuses to start on errors unless ``--skip-checks``.

Input: a ``.jsonl`` file (one JSON object per line), a ``.json`` file (an array of objects, a single
record object, or an object with one of the keys ``data``/``train``/``records``/``examples``/``rows``
holding the array), or a folder searched recursively for both (hidden folders skipped).

Formats, detected per record (first match wins):

========================  ==============================================================================
``chat``                  ``{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}``
                          (role ``developer`` is read as ``system``; content may be a list of
                          ``{"type": "text", "text": ...}`` parts, which are joined)
``sharegpt``              ``{"conversations": [{"from": "system"|"human"|"gpt", "value": str}, ...]}``
                          (``user``/``assistant``/``chatgpt``/``model`` accepted as ``from`` too)
``alpaca``                ``{"instruction", "output"}`` + optional ``input``, ``system``, ``history``
                          (``[[q, a], ...]``); user content = instruction + "\\n\\n" + input when input
                          is non-empty
``prompt_response``       ``{"prompt", "response"}``; also ``{"prompt", "completion"}``,
                          ``{"question", "answer"}`` and ``{"input", "output"}`` (without
                          ``instruction``); optional ``system``
``text``                  ``{"text": str}``: raw text for continued pre-training (``messages`` is None)
========================  ==============================================================================

Other keys are ignored. Line numbers are 1-based; for ``.json`` arrays the line is where the record's
object starts in the file (exact, not an index).

Public API (stable):

- ``read_text_dataset(path) -> TextDatasetScan`` (``.records``, ``.findings``, ``.files``, ``.formats``,
  ``has_errors``). Raises ``FileNotFoundError`` when ``path`` does not exist.
- ``TextRecord(file, line, fmt, messages, text)``, ``Message(role, content)``.
- ``normalise_record(obj) -> (fmt, messages, text)``; raises ``RecordError(code, detail, fmt)``.
- ``TEXT_EXTENSIONS``, ``FORMATS``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from loratui.data.findings import Example, Finding, FindingBag
from loratui.util.jsonsafe import TOO_DEEP

Role = Literal["system", "user", "assistant"]
TEXT_EXTENSIONS = (".jsonl", ".json")
FORMATS = ("chat", "sharegpt", "alpaca", "prompt_response", "text")
ARRAY_KEYS = ("data", "train", "records", "examples", "rows")

_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "model": "assistant",
}


@dataclass(frozen=True)
class Message:
    """One chat turn."""

    role: Role
    content: str


@dataclass
class TextRecord:
    """One training record: ``messages`` for conversational formats, ``text`` for the ``text`` format."""

    file: str  # path relative to the dataset folder (the file name for a single file)
    line: int  # 1-based line where the record starts
    fmt: str  # one of FORMATS
    messages: list[Message] | None = None
    text: str | None = None

    def plain_text(self) -> str:
        """All content joined by newlines (for approximate token counts and duplicate detection)."""
        if self.messages is None:
            return self.text or ""
        return "\n".join(m.content for m in self.messages)


class RecordError(Exception):
    """A record that cannot be used: ``code`` is the finding code, ``detail`` says what is wrong."""

    def __init__(self, code: str, detail: str, fmt: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.fmt = fmt


@dataclass
class TextDatasetScan:
    """What ``read_text_dataset`` found."""

    root: Path
    files: list[Path]
    records: list[TextRecord]
    findings: list[Finding]
    formats: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> {fmt: count}
    total_bytes: int = 0

    @property
    def has_errors(self) -> bool:
        """True when any finding is an error."""
        return any(f.severity == "error" for f in self.findings)

    def format_of(self, file: str) -> str | None:
        """The file's format, ``"mixed"`` when it has several, None when it has no valid records."""
        counts = self.formats.get(file) or {}
        if not counts:
            return None
        return next(iter(counts)) if len(counts) == 1 else "mixed"


# --- record normalisation -----------------------------------------------------------------------


def _string(obj: dict[str, Any], key: str, fmt: str, *, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError("missing_fields", f"no {key!r} field", fmt)
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError("missing_fields", f"{key!r} is {type(value).__name__}, expected a string", fmt)
    return value


def _content(value: Any, where: str, fmt: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # multimodal-style parts: keep the text parts
        parts = [p.get("text") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        if all(isinstance(p, str) for p in parts):
            return "".join(parts)
    kind = "missing" if value is None else type(value).__name__
    raise RecordError("missing_fields", f"{where}: content is {kind}, expected a string", fmt)


def _turns(
    turns: Any, key: str, fmt: str, roles: dict[str, str], role_key: str, text_key: str
) -> list[Message]:
    if not isinstance(turns, list) or not turns:
        raise RecordError("missing_fields", f"{key!r} must be a non-empty list", fmt)
    out: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("missing_fields", f"{key}[{i}] is not an object", fmt)
        rk, tk = role_key, text_key
        if rk not in turn and "role" in turn:  # sharegpt files written with role/content keys
            rk, tk = "role", "content"
        raw_role = turn.get(rk)
        if raw_role is None:
            raise RecordError("missing_fields", f"{key}[{i}] has no {rk!r}", fmt)
        role = roles.get(str(raw_role).strip().lower())
        if role is None:
            raise RecordError("bad_role", f"{key}[{i}] has role {raw_role!r}", fmt)
        out.append(Message(role, _content(turn.get(tk), f"{key}[{i}]", fmt)))  # type: ignore[arg-type]
    return out


def _check_response(messages: list[Message], fmt: str) -> None:
    answers = [m for m in messages if m.role == "assistant"]
    if not answers:
        raise RecordError("empty_response", "no assistant turn", fmt)
    for m in answers:
        if not m.content.strip():
            raise RecordError("empty_response", "an assistant turn is empty", fmt)


def _with_system(obj: dict[str, Any], fmt: str, messages: list[Message]) -> list[Message]:
    system = _string(obj, "system", fmt, required=False)
    return [Message("system", system), *messages] if system.strip() else messages


def _pair_keys(obj: dict[str, Any]) -> tuple[str, str] | None:
    """The (prompt key, response key) of a prompt/response record, or None."""
    if "prompt" in obj:
        return (
            ("prompt", "completion")
            if "completion" in obj and "response" not in obj
            else ("prompt", "response")
        )
    if "question" in obj or "answer" in obj:
        return "question", "answer"
    if "input" in obj and "output" in obj:
        return "input", "output"
    return None


def normalise_record(obj: Any) -> tuple[str, list[Message] | None, str | None]:
    """Detect the format of one parsed JSON value and normalise it. Raises ``RecordError``."""
    if not isinstance(obj, dict):
        raise RecordError("not_an_object", f"a JSON {type(obj).__name__}, expected an object")
    if "messages" in obj:
        msgs = _turns(obj["messages"], "messages", "chat", _CHAT_ROLES, "role", "content")
        _check_response(msgs, "chat")
        return "chat", msgs, None
    if "conversations" in obj:
        msgs = _turns(obj["conversations"], "conversations", "sharegpt", _SHAREGPT_ROLES, "from", "value")
        _check_response(msgs, "sharegpt")
        return "sharegpt", msgs, None
    if "instruction" in obj:
        fmt = "alpaca"
        instruction = _string(obj, "instruction", fmt)
        extra = _string(obj, "input", fmt, required=False)
        output = _string(obj, "output", fmt)
        if not instruction.strip():
            raise RecordError("missing_fields", "'instruction' is empty", fmt)
        user = instruction + "\n\n" + extra if extra.strip() else instruction
        msgs: list[Message] = []
        for i, pair in enumerate(obj.get("history") or []):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RecordError("missing_fields", f"history[{i}] must be [question, answer]", fmt)
            msgs += [Message("user", pair[0]), Message("assistant", pair[1])]
        if not output.strip():
            raise RecordError("empty_response", "'output' is empty", fmt)
        msgs += [Message("user", user), Message("assistant", output)]
        msgs = _with_system(obj, fmt, msgs)
        _check_response(msgs, fmt)
        return fmt, msgs, None
    pair = _pair_keys(obj)
    if pair is not None:
        fmt = "prompt_response"
        pkey, rkey = pair
        for key in pair:
            if key not in obj:
                other = " (or 'completion')" if key == "response" else ""
                raise RecordError("missing_fields", f"no {key!r}{other} field", fmt)
        prompt = _string(obj, pkey, fmt)
        response = _string(obj, rkey, fmt)
        if not prompt.strip():
            raise RecordError("missing_fields", f"{pkey!r} is empty", fmt)
        if not response.strip():
            raise RecordError("empty_response", f"{rkey!r} is empty", fmt)
        msgs = _with_system(obj, fmt, [Message("user", prompt), Message("assistant", response)])
        _check_response(msgs, fmt)
        return fmt, msgs, None
    if "text" in obj:
        text = _string(obj, "text", "text")
        if not text.strip():
            raise RecordError("empty_text", "'text' is empty", "text")
        return "text", None, text
    keys = ", ".join(list(obj)[:8]) or "no keys"
    raise RecordError("unknown_format", f"keys: {keys}")


# --- file reading -------------------------------------------------------------------------------


def _line_of(text: str, pos: int, cache: list[int]) -> int:
    """1-based line of character offset ``pos`` (incremental: positions must not decrease)."""
    last_pos, last_line = cache
    last_line += text.count("\n", last_pos, pos)
    cache[0], cache[1] = pos, last_line
    return last_line


def _iter_json_array(text: str, label: str, bag: FindingBag) -> list[tuple[int, Any]]:
    """(line, value) for each element of a top-level JSON value; errors reported with lines."""
    decoder = json.JSONDecoder()
    ws = " \t\r\n"
    i = len(text) - len(text.lstrip(ws))
    cache = [0, 1]
    if i >= len(text):
        return []
    if text[i] != "[":
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            bag.add("json_parse_error", Example(label, exc.lineno, f"{exc.msg} (column {exc.colno})"))
            return []
        except RecursionError:
            bag.add("json_parse_error", Example(label, _line_of(text, i, cache), f"the value {TOO_DEEP}"))
            return []
        if text[end:].strip():
            line = _line_of(text, end, cache)
            bag.add("json_parse_error", Example(label, line, "extra data after the top-level value"))
        if isinstance(obj, dict):
            for key in ARRAY_KEYS:
                if isinstance(obj.get(key), list) and not any(
                    k in obj for k in ("messages", "conversations")
                ):
                    return _nested_array(text, i, key, obj[key], label, bag)
            return [(_line_of(text, i, cache), obj)]
        bag.add("json_not_records", Example(label, 1, f"top-level value is a {type(obj).__name__}"))
        return []
    return _elements(text, i, label, bag)


def _nested_array(
    text: str, start: int, key: str, values: list[Any], label: str, bag: FindingBag
) -> list[tuple[int, Any]]:
    """Elements of ``{"<key>": [...]}`` with their start lines (falls back to the object's line)."""
    pos = text.find("[", text.find(f'"{key}"', start))
    if pos >= 0:
        probe = FindingBag()
        found = _elements(text, pos, label, probe)
        if len(found) == len(values) and not probe.to_list():
            return found
    line = text.count("\n", 0, start) + 1
    return [(line, v) for v in values]


def _elements(text: str, start: int, label: str, bag: FindingBag) -> list[tuple[int, Any]]:
    """Parse the array starting at ``text[start] == "["`` element by element (exact start lines)."""
    decoder = json.JSONDecoder()
    cache = [0, 1]
    out: list[tuple[int, Any]] = []
    i = start + 1
    n = len(text)

    def skip(j: int) -> int:
        while j < n and text[j] in " \t\r\n":
            j += 1
        return j

    i = skip(i)
    if i < n and text[i] == "]":
        return out
    while True:
        try:
            value, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as exc:
            bag.add("json_parse_error", Example(label, exc.lineno, f"{exc.msg} (column {exc.colno})"))
            return out
        except RecursionError:
            bag.add("json_parse_error", Example(label, _line_of(text, i, cache), f"the record {TOO_DEEP}"))
            return out
        out.append((_line_of(text, i, cache), value))
        i = skip(end)
        if i < n and text[i] == ",":
            i = skip(i + 1)
            continue
        if i < n and text[i] == "]":
            return out
        line = _line_of(text, min(i, n), cache)
        bag.add("json_parse_error", Example(label, line, "expected ',' or ']' between records"))
        return out


def _read_jsonl(data: bytes, label: str, bag: FindingBag) -> list[tuple[int, Any]]:
    out: list[tuple[int, Any]] = []
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            bag.add(
                "text_not_utf8",
                Example(label, lineno, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1}"),
            )
            continue
        try:
            out.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            bag.add("jsonl_parse_error", Example(label, lineno, f"{exc.msg} (column {exc.colno})"))
        except RecursionError:
            bag.add("jsonl_parse_error", Example(label, lineno, f"the record {TOO_DEEP}"))
    return out


def _read_json(data: bytes, label: str, bag: FindingBag) -> list[tuple[int, Any]]:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bag.add("text_not_utf8", Example(label, line, f"byte 0x{data[exc.start]:02x}; the file is not read"))
        return []
    return _iter_json_array(text, label, bag)


def json_values(file: Path, data: bytes, label: str, bag: FindingBag) -> list[tuple[int, Any]]:
    """(line, parsed value) of every record in one .jsonl/.json file's bytes; parse problems become findings."""
    if file.suffix.lower() == ".jsonl" and not data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return _read_jsonl(data, label, bag)
    return _read_json(data, label, bag)


def list_dataset_files(path: Path) -> list[Path]:
    """The .jsonl/.json files of a file or folder (searched recursively, hidden ones skipped)."""
    return _list_files(path)


def _list_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.lower().endswith(TEXT_EXTENSIONS)]
        files = [f for f in files if not f.name.startswith(".")]
    return files


def _record_key(fmt: str, messages: list[Message] | None, text: str | None) -> bytes:
    payload = json.dumps([text] if messages is None else [[m.role, m.content] for m in messages])
    return hashlib.blake2b(payload.encode("utf-8"), digest_size=16).digest()


def dataset_files(path: Path) -> tuple[Path, list[Path]]:
    """(root, .jsonl/.json files) of a dataset file or folder; FileNotFoundError when it does not exist."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}")
    return (path if path.is_dir() else path.parent), _list_files(path)


def read_files(root: Path, files: list[Path], bag: FindingBag) -> Iterator[tuple[Path, str, bytes]]:
    """(file, label relative to root, bytes) of each readable file, one at a time; an unreadable file
    (permission, I/O error) is a finding and the others are still read."""
    for file in files:
        label = file.relative_to(root).as_posix()
        try:
            data = file.read_bytes()
        except OSError as exc:
            bag.add("file_unreadable", Example(label, None, exc.strerror or str(exc)))
            continue
        yield file, label, data


def note_repeat(
    seen: dict[bytes, tuple[str, int]], key: bytes, label: str, line: int, bag: FindingBag
) -> None:
    """A `duplicate_record` finding when `key` was seen before; otherwise remember where it first appeared."""
    first = seen.get(key)
    if first is not None:
        bag.add("duplicate_record", Example(label, line, f"same as {first[0]}:{first[1]}"))
    else:
        seen[key] = (label, line)


def note_file_shape(label: str, data: bytes, counts: Counter[str], bag: FindingBag) -> None:
    """Findings about a whole file: empty, or records of more than one format."""
    if not data.strip():
        bag.add("empty_file", Example(label))
    if len(counts) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in counts.most_common())
        bag.add("mixed_formats", Example(label, None, detail))


def read_text_dataset(path: Path) -> TextDatasetScan:
    """Read and normalise every record of a .jsonl/.json file or folder; problems become findings."""
    root, files = dataset_files(path)
    bag = FindingBag()
    records: list[TextRecord] = []
    formats: dict[str, dict[str, int]] = {}
    seen: dict[bytes, tuple[str, int]] = {}
    total_bytes = 0
    for file, label, data in read_files(root, files, bag):
        total_bytes += len(data.strip())
        values = json_values(file, data, label, bag)
        counts: Counter[str] = Counter()
        for line, obj in values:
            try:
                fmt, messages, text = normalise_record(obj)
            except RecordError as err:
                bag.add(err.code, Example(label, line, err.detail + (f" ({err.fmt})" if err.fmt else "")))
                continue
            counts[fmt] += 1
            note_repeat(seen, _record_key(fmt, messages, text), label, line, bag)
            records.append(TextRecord(label, line, fmt, messages, text))
        formats[label] = dict(counts.most_common())
        note_file_shape(label, data, counts, bag)
    return TextDatasetScan(
        root=root,
        files=files,
        records=records,
        findings=bag.to_list(),
        formats=formats,
        total_bytes=total_bytes,
    )
