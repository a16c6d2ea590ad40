"""`loratui demo --task text`: a LoRA teaches a small pretrained model a format and facts, offline, on CPU.

The base is the Llama shipped in the package (``loratui/tiny_models/pretrained/health-llama``), pretrained on
generated health-advice sentences: it writes on-topic text but knows neither the question/answer format nor
the answers of the bundled medical Q&A set. The demo copies that set, checks it, trains a LoRA through the
real trainer (run directory, events, checkpoints, PEFT export) holding out a share of the pairs, then prints
the validation loss on the held-out answers and greedy answers, base vs base + LoRA, side by side.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from io import StringIO
from pathlib import Path
from typing import Any

import yaml

from loratui.demo.session import demo_session
from loratui.demo.session import say as _say

DEFAULT_STEPS = 160
VAL_SPLIT = 0.2
SEED = 0
MAX_NEW_TOKENS = 60
PROMPTS = ["患者：头痛三天，体温正常，该吃什么药？", "Patient: I twisted my ankle and it is swollen."]


def bundled_data(dest: Path) -> Path:
    """Copy the bundled medical Q&A set to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = resources.files("loratui.demo").joinpath("text_assets", "medical_qa.jsonl")
    with resources.as_file(source) as path:
        shutil.copyfile(path, dest)
    return dest


def write_config(out: Path, model: Path, data: Path, steps: int) -> Path:
    """The demo's training config (an ordinary loratui YAML file) in ``out``."""
    config = {
        "task_type": "text-generation",
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(out / "adapter"),
        "runs_dir": str(out / "runs"),
        "run_name": "text-demo",
        "lora_rank": 16,
        "lora_alpha": 16,
        "target_modules": [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "lm_head",
        ],
        "learning_rate": 1e-2,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 5,
        "batch_size": 4,
        "max_steps": steps,
        "max_seq_len": 320,
        "val_split": VAL_SPLIT,
        "mixed_precision": "no",
        "save_steps": max(1, steps // 2),
        "log_every_steps": max(1, steps // 6),
        "sample_prompts": [PROMPTS[0]],
        "sample_every_steps": steps,
        "seed": SEED,
    }
    path = out / "llm_demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def prepare_demo(out: Path, steps: int | None = None) -> Path:
    """The shipped model, the bundled data copied into ``out`` and the config; returns the config's path."""
    from loratui.tiny_models.pretrain.text import shipped_text_model

    out = Path(out).absolute()
    data = bundled_data(out / "data" / "medical_qa.jsonl")
    return write_config(out, shipped_text_model(), data, steps or DEFAULT_STEPS)


def split_records(
    data: Path, val_split: float = VAL_SPLIT, seed: int = SEED
) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records, split as the trainer splits them (same fraction and seed)."""
    from loratui.models.llm.batches import split_validation

    records = [json.loads(line) for line in data.read_text("utf-8").splitlines() if line.strip()]
    return split_validation(records, val_split, seed)


def _check(console: Any, data: Path, model: Path) -> bool:
    from loratui.data.check import run_checks

    report = run_checks(data, task="text", tokenizer_path=model, max_seq_len=320)
    counts = report.counts()
    _say(console, f"dataset check: {counts['error']} error(s), {counts['warning']} warning(s) in {data}")
    return not report.has_errors


def pick_prompts(records: list[dict], count: int = 2) -> list[str]:
    """Up to ``count`` prompts without a system message (answers are generated without one), a Chinese and
    an English one first when there are both."""
    plain = [r["prompt"] for r in records if not r.get("system")]
    chinese = [p for p in plain if not p.isascii()]
    english = [p for p in plain if p.isascii()]
    picked = [group[0] for group in (chinese, english) if group]
    return (picked + [p for p in plain if p not in picked])[:count]


def answers(result: Any, prompts: list[str]) -> list[tuple[str, str, str]]:
    """(prompt, base answer, base + LoRA answer) for each prompt, greedy."""
    from loratui.models.llm.generate import generate_answer

    model, tokenizer, template = result.model, result.tokenizer, result.template
    rows = []
    for prompt in prompts:
        with model.disable_adapter():
            before = generate_answer(model, tokenizer, template, prompt, max_new_tokens=MAX_NEW_TOKENS)
        after = generate_answer(model, tokenizer, template, prompt, max_new_tokens=MAX_NEW_TOKENS)
        rows.append((prompt, before.strip(), after.strip()))
    return rows


def validation_losses(result: Any, batch_size: int) -> tuple[float, float]:
    """Loss on the held-out answers: (base, base + LoRA)."""
    from loratui.train.llm.outputs import evaluate

    model, pad = result.model, result.tokenizer.pad_token_id
    device = next(model.parameters()).device
    with model.disable_adapter():
        base = evaluate(model, result.data, batch_size, pad, device)
    return base, evaluate(model, result.data, batch_size, pad, device)


def side_by_side(rows: list[tuple[str, str, str, str]], width: int) -> list[str]:
    """A table (split, prompt, base, base + LoRA) as plain text lines ``width`` columns wide."""
    from rich.console import Console
    from rich.table import Table

    table = Table(show_lines=True, expand=True)
    table.add_column("", no_wrap=True)
    table.add_column("prompt", ratio=2, overflow="fold")
    table.add_column("base", ratio=3, overflow="fold")
    table.add_column("base + LoRA", ratio=3, overflow="fold")
    for row in rows:
        table.add_row(*row)
    buffer = StringIO()
    Console(file=buffer, width=width, color_system=None, legacy_windows=False).print(table)
    return buffer.getvalue().rstrip("\n").splitlines()


def _compare(console: Any, result: Any, batch_size: int, data: Path) -> None:
    base_loss, lora_loss = validation_losses(result, batch_size)
    train, held_out = split_records(data)
    _say(
        console,
        f"validation loss on held-out answers ({len(held_out)} pairs): base {base_loss:.3f} -> base + LoRA "
        f"{lora_loss:.3f} ({base_loss - lora_loss:+.3f} drop)",
    )
    chosen = [("held out", p) for p in pick_prompts(held_out)] + [("trained", p) for p in pick_prompts(train)]
    rows = answers(result, [p for _, p in chosen])
    _say(console, "greedy answers, base vs base + LoRA (held out: pairs the LoRA never saw):")
    width = max(80, min(int(getattr(console, "width", 120) or 120), 160))
    for line in side_by_side([(kind, *row) for (kind, _), row in zip(chosen, rows, strict=True)], width):
        _say(console, line)


def run_demo(out: Path, steps: int | None = None, console: Any = None) -> int:
    """Run the text demo in `out`; returns the exit code."""
    from loratui.runs.events import read_events
    from loratui.train.job import WorkerJob
    from loratui.train.llm.trainer import run_training

    with demo_session(out, steps, DEFAULT_STEPS, console) as demo:
        out, steps, console = demo.out, demo.steps, demo.console
        config_path = prepare_demo(out, steps)
        config = yaml.safe_load(config_path.read_text("utf-8"))
        model_dir, data = Path(config["base_model"]), Path(config["train_data_dir"])
        demo.say(f"base model: {model_dir} (small Llama pretrained on generated health-advice sentences)")
        if not _check(console, data, model_dir):
            demo.say(f"the bundled dataset failed its check; run `loratui check {data}`")
            return 1
        resolved, run = demo.start_run(config_path)
        demo.say(f"training {steps} steps; run directory {run.path}")
        result = run_training(WorkerJob(run, resolved, None, True), console=True)
        if result.state != "finished":  # Ctrl-C: the run saved a checkpoint and stopped
            demo.say(f"training {result.state}")
            return 1
        losses = [e["loss"] for e in read_events(run.events_path) if e["type"] == "step"]
        demo.say(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        _compare(console, result, resolved.config.batch_size, data)
    _summary(console, out, config_path, run.path, result.adapter_dir, demo.seconds())
    return 0


def _summary(console: Any, out: Path, config: Path, run: Path, adapter: Path, seconds: float) -> None:
    _say(console)
    _say(console, f"done in {seconds:.0f} s")
    _say(console, f"  config:  {config}")
    _say(console, f"  run:     {run} (events.jsonl, checkpoints/, logs/ for TensorBoard, samples/)")
    _say(console, f"  adapter: {adapter} (PEFT folder: adapter_config.json, adapter_model.safetensors)")
    _say(console)
    _say(
        console,
        "The same with a real model (a Hugging Face folder with config.json, *.safetensors, tokenizer):",
    )
    _say(
        console,
        "  loratui train --config examples/llm_medical_qa.yaml --base-model ./models/Llama-2-7b-chat-hf \\",
    )
    _say(console, "      --train-data-dir ./data/medical_qa --output-dir ./output/medical-qa")
    _say(console, "  loratui sample --base ./models/Llama-2-7b-chat-hf --lora ./output/medical-qa \\")
    _say(console, f'      --prompt "{PROMPTS[0]}" --compare')
    _say(console, "  loratui export runs/<run> --merge --dtype bf16     # a merged full model")
    _say(console, "On a GPU with little memory add --set load_in_4bit=true (QLoRA; needs bitsandbytes).")
