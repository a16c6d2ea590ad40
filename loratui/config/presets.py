"""Preset files: named VRAM tiers with one settings section per model family.

Found in the installed wheel (`loratui/_bundled_presets/`) or, from a source checkout, in the top-level
`presets/` folder. `$LORATUI_PRESETS_DIR` adds a folder of user presets searched first.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from loratui.config.errors import ConfigError, ConfigProblem
from loratui.config.yaml_source import read_yaml_file

#: LLM sections are by size class: ~1-3B, 7-9B, 12-14B, 30-34B and 70B parameters (the names keep the seed's
#: `llm-7b` / `llm-13b` for the 7-9B and 12-14B classes)
LLM_SIZE_CLASSES = (
    ("llm-3b", 5e9),
    ("llm-7b", 10.5e9),
    ("llm-13b", 20e9),
    ("llm-32b", 50e9),
    ("llm-70b", float("inf")),
)
PRESET_FAMILIES = ("sd15", "sdxl", "flux-dev", *(name for name, _ in LLM_SIZE_CLASSES))
#: model families whose runs take the `flux-dev` section (FLUX.1-dev, schnell and Chroma)
FLUX_PRESET_FAMILIES = ("flux", "chroma")


def llm_preset_family(params: float) -> str:
    """The LLM preset section for a model of `params` parameters (unknown size: the 7-9B class)."""
    if params <= 0:
        return "llm-7b"
    return next(name for name, limit in LLM_SIZE_CLASSES if params <= limit)


@dataclass
class Preset:
    """One preset file."""

    name: str
    description: str
    vram: str  # human tier, e.g. "6-8 GB"
    vram_gb: float  # the card size the settings are verified against
    families: dict[str, dict[str, object]] = field(default_factory=dict)
    unsupported: dict[str, str] = field(default_factory=dict)  # family -> why no setting fits this tier
    path: Path | None = None
    lines: dict[str, int] = field(default_factory=dict)


def preset_dirs() -> list[Path]:
    """Folders searched for presets, first match wins."""
    dirs: list[Path] = []
    if os.environ.get("LORATUI_PRESETS_DIR"):
        dirs.append(Path(os.environ["LORATUI_PRESETS_DIR"]))
    package = Path(__file__).resolve().parent.parent  # the loratui package
    dirs.append(package / "_bundled_presets")
    dirs.append(package.parent / "presets")
    return [d for d in dirs if d.is_dir()]


def preset_names() -> list[str]:
    """All preset names, in VRAM order."""
    names: dict[str, None] = {}
    for folder in preset_dirs():
        for path in sorted(folder.glob("*.yaml")):
            names.setdefault(path.stem, None)
    return sorted(names, key=lambda n: (load_preset(n).vram_gb, n))


def find_preset(name: str) -> Path | None:
    """The path of preset `name`, or None."""
    for folder in preset_dirs():
        path = folder / f"{name}.yaml"
        if path.is_file():
            return path
    return None


def load_preset(name: str) -> Preset:
    """Load and structurally validate a preset (section values are validated with the config)."""
    path = find_preset(name)
    if path is None:
        import difflib

        known = [p.stem for d in preset_dirs() for p in d.glob("*.yaml")]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"available: {', '.join(sorted(set(known)))}"
        raise ConfigError([ConfigProblem("preset", f"unknown preset `{name}`", hint, "--preset")])
    data = read_yaml_file(path)
    problems = list(data.problems)
    families = data.values.get("families") or {}
    if not isinstance(families, dict):
        problems.append(ConfigProblem("families", "must be a mapping of family -> settings", "", str(path)))
        families = {}
    for family, section in families.items():
        if family not in PRESET_FAMILIES and family != "sd2":
            problems.append(
                ConfigProblem(
                    f"families.{family}",
                    "unknown family",
                    f"use one of {', '.join(PRESET_FAMILIES)}",
                    str(path),
                    data.lines.get("families"),
                )
            )
        elif not isinstance(section, dict):
            problems.append(ConfigProblem(f"families.{family}", "must be a mapping", "", str(path)))
    unsupported = data.values.get("unsupported") or {}
    if not isinstance(unsupported, dict) or not all(isinstance(v, str) for v in unsupported.values()):
        problems.append(ConfigProblem("unsupported", "must be a mapping of family -> reason", "", str(path)))
        unsupported = {}
    for family in unsupported:
        if family in families or family not in PRESET_FAMILIES:
            problems.append(
                ConfigProblem(
                    f"unsupported.{family}",
                    "must be a known family without a settings section",
                    f"use one of {', '.join(PRESET_FAMILIES)}",
                    str(path),
                    data.lines.get("unsupported"),
                )
            )
    try:
        vram_gb = float(data.values.get("vram_gb", 0))
    except (TypeError, ValueError):
        problems.append(ConfigProblem("vram_gb", "must be a number of GB", "e.g. vram_gb: 8", str(path)))
        vram_gb = 0.0
    if problems:
        raise ConfigError(problems)
    return Preset(
        name=name,
        description=str(data.values.get("description", "")),
        vram=str(data.values.get("vram", f"{vram_gb:g} GB")),
        vram_gb=vram_gb,
        families={k: dict(v) for k, v in families.items()},
        unsupported={str(k): str(v) for k, v in unsupported.items()},
        path=path,
        lines=data.lines,
    )


def preset_section(preset: Preset, family: str) -> dict[str, object]:
    """Settings for `family` (sd15/sd2/sdxl or an LLM size class); sd2 falls back to sd15's section."""
    if family in preset.families:
        return dict(preset.families[family])
    if family == "sd2" and "sd15" in preset.families:
        return dict(preset.families["sd15"])
    return {}
