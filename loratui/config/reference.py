"""Render the config reference (docs/config.md) from the schema: `python -m loratui.config.reference`."""

from __future__ import annotations

import json

from loratui.config.aliases import KEY_ALIASES
from loratui.config.schema import TrainConfig
from loratui.config.task_keys import FLUX_ONLY, IMAGE_ONLY, METHOD_KEYS, SD_ONLY, TEXT_ONLY, VARIANT_KEYS

INTRO = """# Config reference

One YAML file describes a training run. Values are resolved in this order, lowest first:

1. built-in defaults (below),
2. `--preset NAME`: the preset's section for the model family (`sd15`, `sdxl`; LLMs by size: `llm-3b`,
   `llm-7b`, `llm-13b`, `llm-32b`, `llm-70b`; SD2 models use the `sd15` section),
3. the config file (`--config x.yaml`),
4. `--set key=value` overrides (values are parsed as YAML: `--set target_modules=[to_q,to_k]`),
5. explicit flags (`--lora-rank 16`, `--batch-size 2`, ...).

`loratui train --config x.yaml --dry-run` prints every value and where it came from; the resolved config is
written into each run directory as `config.yaml` and can be rerun as is. Relative paths are relative to the
directory you run loratui from. All mistakes are reported at once, with file, line, key and a hint.

Some keys are read by one task type only (see the end of this page). When you set one of them (file, `--set`,
flag or preset) for a run of the other type, `loratui train --dry-run` and the start of `loratui train` print a
`warning:` line naming the key, where it was set and why it does nothing (`--dry-run --json` lists them under
`ignored`). Values equal to the default are not reported.

This file is generated from the schema (`python -m loratui.config.reference > docs/config.md`).
"""


def _default(name: str) -> str:
    field = TrainConfig.model_fields[name]
    if field.default_factory is not None:
        return json.dumps(field.default_factory())
    return json.dumps(field.default)


def render() -> str:
    """The whole markdown page."""
    aliases: dict[str, list[str]] = {}
    for alias, canon in sorted(KEY_ALIASES.items()):
        aliases.setdefault(canon, []).append(alias)
    lines = [INTRO, "| key | default | meaning | also accepted as |", "|---|---|---|---|"]
    for name, field in TrainConfig.model_fields.items():
        also = ", ".join(f"`{a}`" for a in aliases.get(name, []))
        lines.append(f"| `{name}` | `{_default(name)}` | {field.description or ''} | {also} |")
    lines += ["", "## Keys for one task type", ""]
    for title, keys in (
        ("Read by text (LLM) runs only; an image run warns when they are set:", TEXT_ONLY),
        ("Read by image (SD) runs only; a text run warns when they are set:", IMAGE_ONLY),
    ):
        lines += [title, "", "| key | why the other task ignores it |", "|---|---|"]
        lines += [f"| `{key}` | {reason} |" for key, reason in keys.items()]
        lines.append("")
    for title, keys in (
        (
            "Read by Flux-family (FLUX.1, Chroma) runs only; SD and text runs warn when they are set:",
            FLUX_ONLY,
        ),
        ("Read by SD runs but not by Flux-family runs; a Flux run warns when they are set:", SD_ONLY),
    ):
        lines += [title, "", "| key | why the other runs ignore it |", "|---|---|"]
        lines += [f"| `{key}` | {reason} |" for key, reason in keys.items()]
        lines.append("")
    lines += [
        "Not read by some Flux variants (found from the base model's files); a run of such a variant warns:",
        "",
        "| key | ignored by | why |",
        "|---|---|---|",
    ]
    lines += [f"| `{key}` | {', '.join(variants)} | {why} |" for key, (variants, why) in VARIANT_KEYS.items()]
    lines.append("")
    lines += [
        "Read by some training methods (`method`) of text runs only; a text run with another method warns:",
        "",
        "| key | read by | why the other methods ignore it |",
        "|---|---|---|",
    ]
    lines += [f"| `{key}` | {', '.join(methods)} | {why} |" for key, (methods, why) in METHOD_KEYS.items()]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
