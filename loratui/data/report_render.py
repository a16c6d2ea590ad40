"""Rendering a check ``Report`` for people: rich tables on a terminal, plain text otherwise.

Plain text is used when output is not a TTY, ``NO_COLOR`` is set or ``TERM=dumb``
(``loratui.cli.common.plain_output``). Machine-readable output is ``Report.to_json()``.
"""

from __future__ import annotations

from typing import Any

from loratui.data.findings import Finding, Report

SEVERITY_TITLES = {"error": "Errors", "warning": "Warnings", "info": "Info"}
SEVERITY_STYLES = {"error": "bold red", "warning": "yellow", "info": "cyan"}
_SUMMARY_LABELS = {
    "images": "images",
    "images_x_repeats": "images x repeats",
    "batch_size": "batch size",
    "steps_per_epoch": "steps per epoch",
    "resolution": "resolution",
    "captioned": "captioned",
    "caption_sources": "caption sources",
    "files": "files",
    "records": "records",
    "max_seq_len": "max_seq_len",
    "over_max_seq_len": "over max_seq_len",
    "mode": "mode",
    "elapsed_s": "seconds",
}


def _summary_rows(report: Report) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, label in _SUMMARY_LABELS.items():
        if key not in report.summary or report.summary[key] is None:
            continue
        value: Any = report.summary[key]
        if isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items())
        rows.append((label, str(value)))
    if report.task == "text" and isinstance(report.summary.get("formats"), dict):
        for file, counts in report.summary["formats"].items():
            rows.append((f"format of {file}", ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"))
    return rows


def _examples(finding: Finding, max_examples: int) -> list[str]:
    out = []
    for ex in finding.examples[:max_examples]:
        out.append(ex.location() + (f": {ex.detail}" if ex.detail else ""))
    hidden = finding.count - min(len(finding.examples), max_examples)
    if finding.examples and hidden > 0:
        out.append(f"... and {hidden} more")
    return out


def _verdict(report: Report) -> str:
    counts = report.counts()
    if report.unusable:
        return "The input is not a usable dataset (exit code 2)."
    head = f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info."
    if report.has_errors:
        return head + " Fix the errors before training (or train anyway with --skip-checks). Exit code 1."
    return head + " Ready to train. Exit code 0."


def format_report_text(report: Report, max_examples: int = 5) -> str:
    """The report as plain text (no colours, no box drawing)."""
    lines = [f"Dataset check: {report.path} ({report.task or 'unknown task'})"]
    for label, value in _summary_rows(report):
        lines.append(f"  {label}: {value}")
    for sev in ("error", "warning", "info"):
        group = [f for f in report.findings if f.severity == sev]
        if not group:
            continue
        lines.append("")
        lines.append(f"{SEVERITY_TITLES[sev]}:")
        for f in group:
            count = f" ({f.count})" if f.count else ""
            lines.append(f"  {sev.upper()} {f.code}{count}: {f.message}")
            lines += [f"    - {e}" for e in _examples(f, max_examples)]
            if f.fix:
                lines.append(f"    fix: {f.fix}")
    lines.append("")
    lines.append(_verdict(report))
    return "\n".join(lines)


def render_report(report: Report, console: Any, max_examples: int = 5, plain: bool = False) -> None:
    """Print the report on a rich ``Console`` (``plain=True``: the plain-text form)."""
    if plain:
        console.print(format_report_text(report, max_examples), markup=False, highlight=False, soft_wrap=True)
        return
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]Dataset check:[/bold] {escape(report.path)} ({report.task or 'unknown task'})")
    rows = _summary_rows(report)
    if rows:
        summary = Table(show_header=False, box=None, padding=(0, 2))
        summary.add_column(style="dim")
        summary.add_column()
        for label, value in rows:
            summary.add_row(label, escape(value))
        console.print(summary)
    for sev in ("error", "warning", "info"):
        group = [f for f in report.findings if f.severity == sev]
        if not group:
            continue
        table = Table(
            title=f"{SEVERITY_TITLES[sev]} ({len(group)})",
            title_style=SEVERITY_STYLES[sev],
            title_justify="left",
            show_lines=True,
            expand=True,
        )
        table.add_column("Finding", ratio=3)
        table.add_column("Count", justify="right", width=6)
        table.add_column("Examples", ratio=3)
        table.add_column("Fix", ratio=2)
        for f in group:
            title = f"[{SEVERITY_STYLES[sev]}]{f.code}[/]\n{escape(f.message)}"
            table.add_row(
                title, str(f.count or ""), escape("\n".join(_examples(f, max_examples))), escape(f.fix)
            )
        console.print(table)
    tags = report.summary.get("tag_frequency")
    if isinstance(tags, dict) and tags:
        table = Table(title="Top caption tags", title_justify="left", box=None, padding=(0, 2))
        table.add_column("tag")
        table.add_column("images", justify="right")
        for tag, n in list(tags.items())[:15]:
            table.add_row(escape(tag), str(n))
        console.print(table)
    style = "bold red" if report.has_errors else "bold green"
    console.print(f"[{style}]{escape(_verdict(report))}[/]")
