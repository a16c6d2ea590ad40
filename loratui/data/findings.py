"""Findings and reports shared by the dataset parsers, the checks and the trainers.

Public API (stable):

- ``Example(path: str, line: int | None = None, detail: str = "")``: one place a finding was seen.
- ``Finding(code, severity, message, fix, count=0, examples=[])``: one kind of problem, aggregated.
  ``code`` is a stable snake_case id (see ``loratui.data.codes.CODES``), ``severity`` is
  ``"error" | "warning" | "info"``.
- ``FindingBag``: collects findings by code while scanning (``add(code, example)``), keeping the first
  ``max_examples_kept`` examples of each code and counting all occurrences.
- ``Report(findings, summary, task, path, unusable=False)``: what ``loratui check`` prints;
  ``has_errors``, ``exit_code``, ``to_dict()``, ``to_json()``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Severity = Literal["error", "warning", "info"]
SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}

#: Examples kept per finding while scanning (the renderer shows fewer, see ``--max-examples``).
DEFAULT_EXAMPLES_KEPT = 50


@dataclass
class Example:
    """Where a finding was seen: a file (relative to the dataset root when possible), a 1-based line."""

    path: str
    line: int | None = None
    detail: str = ""

    def location(self) -> str:
        """``path`` or ``path:line``."""
        return f"{self.path}:{self.line}" if self.line is not None else self.path


@dataclass
class Finding:
    """One kind of problem with how often it occurs, some examples and how to fix it."""

    code: str
    severity: Severity
    message: str
    fix: str = ""
    count: int = 0
    examples: list[Example] = field(default_factory=list)
    data: dict[str, Any] | None = None  # structured extras (tag table, token statistics, ...)

    def to_dict(self, max_examples: int | None = None) -> dict[str, Any]:
        """JSON-ready dict; ``max_examples`` truncates the example list."""
        d = asdict(self)
        if max_examples is not None:
            d["examples"] = d["examples"][:max_examples]
        if d["data"] is None:
            del d["data"]
        return d


class FindingBag:
    """Aggregates findings by code, in first-seen order."""

    def __init__(self, max_examples_kept: int = DEFAULT_EXAMPLES_KEPT) -> None:
        self._by_code: dict[str, Finding] = {}
        self.max_examples_kept = max_examples_kept

    def add(
        self,
        code: str,
        example: Example | None = None,
        *,
        severity: Severity | None = None,
        message: str | None = None,
        fix: str | None = None,
        count: int = 1,
        data: dict[str, Any] | None = None,
    ) -> Finding:
        """Count one occurrence of ``code`` (severity/message/fix default to the code catalogue)."""
        from loratui.data.codes import describe

        finding = self._by_code.get(code)
        if finding is None:
            sev, msg, fx = describe(code)
            finding = Finding(code=code, severity=severity or sev, message=message or msg, fix=fix or fx)
            self._by_code[code] = finding
        else:
            if message:
                finding.message = message
            if fix:
                finding.fix = fix
            if severity:
                finding.severity = severity
        finding.count += count
        if example is not None and len(finding.examples) < self.max_examples_kept:
            finding.examples.append(example)
        if data is not None:
            finding.data = data
        return finding

    def extend(self, findings: list[Finding]) -> None:
        """Merge already-built findings (same code: counts add up, examples concatenate)."""
        for f in findings:
            mine = self._by_code.get(f.code)
            if mine is None:
                self._by_code[f.code] = Finding(
                    f.code, f.severity, f.message, f.fix, f.count, list(f.examples), f.data
                )
            else:
                mine.count += f.count
                room = self.max_examples_kept - len(mine.examples)
                mine.examples.extend(f.examples[: max(room, 0)])

    def get(self, code: str) -> Finding | None:
        """The finding for ``code`` or None."""
        return self._by_code.get(code)

    def __contains__(self, code: str) -> bool:
        return code in self._by_code

    def to_list(self) -> list[Finding]:
        """Findings sorted by severity (errors first), then first-seen order."""
        items = list(self._by_code.values())
        return sorted(items, key=lambda f: SEVERITY_ORDER[f.severity])


@dataclass
class Report:
    """The result of ``run_checks``: findings plus a summary (counts, steps per epoch, ...)."""

    findings: list[Finding]
    summary: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    path: str = ""
    unusable: bool = False

    @property
    def has_errors(self) -> bool:
        """True when any finding has severity ``error`` (or the input is unusable)."""
        return self.unusable or any(f.severity == "error" for f in self.findings)

    @property
    def exit_code(self) -> int:
        """0 no errors, 1 errors, 2 unusable input (the ``loratui check`` exit codes)."""
        if self.unusable:
            return 2
        return 1 if self.has_errors else 0

    def by_code(self, code: str) -> Finding | None:
        """The finding with this code, if any."""
        return next((f for f in self.findings if f.code == code), None)

    def codes(self) -> set[str]:
        """All finding codes in the report."""
        return {f.code for f in self.findings}

    def counts(self) -> dict[str, int]:
        """Number of findings (kinds, not occurrences) per severity."""
        out = {"error": 0, "warning": 0, "info": 0}
        for f in self.findings:
            out[f.severity] += 1
        return out

    def to_dict(self, max_examples: int | None = None) -> dict[str, Any]:
        """JSON-ready dict of the whole report."""
        return {
            "path": self.path,
            "task": self.task,
            "unusable": self.unusable,
            "has_errors": self.has_errors,
            "exit_code": self.exit_code,
            "counts": self.counts(),
            "summary": self.summary,
            "findings": [f.to_dict(max_examples) for f in self.findings],
        }

    def to_json(self, max_examples: int | None = None, indent: int | None = 2) -> str:
        """The report as a JSON string."""
        return json.dumps(self.to_dict(max_examples), indent=indent, ensure_ascii=False, default=str)
