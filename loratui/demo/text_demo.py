"""`loratui demo --task text`: the LLM path end to end on a tiny bundled model, offline, on CPU.

Builds a tiny random-weight Llama (`loratui.tiny_models`), copies the bundled medical-QA JSONL, checks it,
trains a LoRA through the real trainer (run directory, events, checkpoints, PEFT export), then reloads the
adapter and prints base vs LoRA answers. The model is tiny and random: answers show that the adapter learnt
the data's wording, not medicine.
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from loratui.demo.session import demo_session
from loratui.demo.session import say as _say

DEFAULT_STEPS = 120
PROMPTS = ["患者：头痛三天，体温正常，该吃什么药？", "Patient: I twisted my ankle and it is swollen."]


def _bundled_data(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    source = resources.files("loratui.demo").joinpath("text_assets", "medical_qa.jsonl")
    with resources.as_file(source) as path:
        shutil.copyfile(path, dest)
    return dest


def _write_config(out: Path, model: Path, data: Path, steps: int) -> Path:
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
        "val_split": 0.1,
        "mixed_precision": "no",
        "save_steps": max(1, steps // 2),
        "log_every_steps": max(1, steps // 6),
        "sample_prompts": [PROMPTS[0]],
        "sample_every_steps": steps,
        "seed": 0,
    }
    path = out / "llm_demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def _check(console: Any, data: Path, model: Path) -> bool:
    from loratui.data.check import run_checks

    report = run_checks(data, task="text", tokenizer_path=model, max_seq_len=320)
    counts = report.counts()
    _say(console, f"dataset check: {counts['error']} error(s), {counts['warning']} warning(s) in {data}")
    return not report.has_errors


def _compare(console: Any, result: Any, batch_size: int) -> None:
    """Validation loss and greedy answers, base vs base + LoRA."""
    from loratui.models.llm.generate import generate_answer
    from loratui.train.llm.outputs import evaluate

    model, tokenizer, template = result.model, result.tokenizer, result.template
    device = next(model.parameters()).device
    with model.disable_adapter():
        base_loss = evaluate(model, result.data, batch_size, tokenizer.pad_token_id, device)
    lora_loss = evaluate(model, result.data, batch_size, tokenizer.pad_token_id, device)
    _say(console, f"validation loss on held-out answers: base {base_loss:.3f} -> base + LoRA {lora_loss:.3f}")
    _say(
        console,
        "greedy answers (a tiny random-weight model writes noise; the loss is what the LoRA changed):",
    )
    for prompt in PROMPTS:
        with model.disable_adapter():
            before = generate_answer(model, tokenizer, template, prompt, max_new_tokens=40)
        after = generate_answer(model, tokenizer, template, prompt, max_new_tokens=40)
        _say(console, f"  prompt: {prompt}")
        _say(console, f"    base:        {before[:80]!r}")
        _say(console, f"    base + LoRA: {after[:80]!r}")


def run_demo(out: Path, steps: int | None = None, console: Any = None) -> int:
    """Run the text demo in `out`; returns the exit code."""
    from loratui.runs.events import read_events
    from loratui.tiny_models.llama import build_tiny_llama
    from loratui.train.job import WorkerJob
    from loratui.train.llm.trainer import run_training

    with demo_session(out, steps, DEFAULT_STEPS, console) as demo:
        out, steps, console = demo.out, demo.steps, demo.console
        model_dir = build_tiny_llama(out / "models" / "tiny-llama")
        demo.say(f"tiny model (random weights, for the demo only): {model_dir}")
        data = _bundled_data(out / "data" / "medical_qa.jsonl")
        if not _check(console, data, model_dir):
            demo.say(f"the bundled dataset failed its check; run `loratui check {data}`")
            return 1
        config_path = _write_config(out, model_dir, data, steps)
        resolved, run = demo.start_run(config_path)
        demo.say(f"training {steps} steps; run directory {run.path}")
        result = run_training(WorkerJob(run, resolved, None, True), console=True)
        if result.state != "finished":  # Ctrl-C: the run saved a checkpoint and stopped
            demo.say(f"training {result.state}")
            return 1
        losses = [e["loss"] for e in read_events(run.events_path) if e["type"] == "step"]
        demo.say(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        _compare(console, result, resolved.config.batch_size)
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
