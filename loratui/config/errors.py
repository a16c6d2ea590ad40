"""Config problems, reported all at once with file, line, key and a fix hint."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigProblem:
    """One thing wrong with a config value."""

    key: str
    message: str
    hint: str = ""
    source: str = ""  # e.g. "x.yaml", "--set", "preset low-vram"
    line: int | None = None

    def location(self) -> str:
        if self.source and self.line:
            return f"{self.source}:{self.line}"
        return self.source or "config"

    def __str__(self) -> str:
        text = (
            f"{self.location()}: `{self.key}`: {self.message}"
            if self.key
            else f"{self.location()}: {self.message}"
        )
        return f"{text} ({self.hint})" if self.hint else text


class ConfigError(Exception):
    """Raised with every problem found in a config, not just the first."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = list(problems)
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        lines = [f"{count} problem{'s' if count != 1 else ''} in the config:"]
        lines += [f"  - {problem}" for problem in self.problems]
        return "\n".join(lines)
