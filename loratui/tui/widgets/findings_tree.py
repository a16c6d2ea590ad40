"""Dataset findings grouped by severity: count, message, fix and example files, as a keyboard tree."""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Tree

SEVERITY_TITLES = {"error": "Errors", "warning": "Warnings", "info": "Notes"}
EXAMPLES_SHOWN = 5


@dataclass(frozen=True)
class FindingNode:
    """What a tree node stands for: a finding (`example` None) or one example file of it."""

    code: str
    severity: str
    example: str | None = None


class FindingsTree(Tree[FindingNode]):
    """`show(report)` rebuilds the tree; errors open, the rest collapsed."""

    COMPONENT_CLASSES = {"findings-tree--error", "findings-tree--warning", "findings-tree--info"}

    def __init__(self, **kwargs) -> None:
        super().__init__("findings", **kwargs)
        self.show_root = False
        self.guide_depth = 2

    def show(self, report) -> None:
        """Fill the tree from a `loratui.data.findings.Report`."""
        self.clear()
        first_group = True
        for severity in ("error", "warning", "info"):
            findings = [f for f in report.findings if f.severity == severity]
            if not findings:
                continue
            style = self.get_component_rich_style(f"findings-tree--{severity}")
            title = Text(f"{SEVERITY_TITLES[severity]} ({len(findings)})", style=style)
            group = self.root.add(title, expand=severity == "error" or first_group)
            first_group = False
            for finding in findings:
                count = f" ×{finding.count}" if finding.count > 1 else ""
                label = Text.assemble((f"{finding.code}{count}", style), f"  {finding.message}")
                node = group.add(label, data=FindingNode(finding.code, severity), expand=severity == "error")
                if finding.fix:
                    node.add_leaf(Text(f"fix: {finding.fix}"), data=FindingNode(finding.code, severity))
                for example in finding.examples[:EXAMPLES_SHOWN]:
                    detail = f"  ({example.detail})" if example.detail else ""
                    node.add_leaf(
                        Text(f"{example.location()}{detail}"),
                        data=FindingNode(finding.code, severity, example.path),
                    )
                if len(finding.examples) > EXAMPLES_SHOWN or finding.count > len(finding.examples):
                    more = max(finding.count, len(finding.examples)) - min(
                        EXAMPLES_SHOWN, len(finding.examples)
                    )
                    if more > 0:
                        node.add_leaf(Text(f"… and {more} more"), data=FindingNode(finding.code, severity))
        self.root.expand()
        self.cursor_line = 1 if report.findings else 0  # the first finding: its full text shows below
