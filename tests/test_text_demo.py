"""`loratui demo --task text` on the shipped small Llama: the LoRA teaches the Q&A set's format and facts."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
import yaml

from loratui.demo.text_demo import DEFAULT_STEPS, prepare_demo, side_by_side, split_records
from loratui.tiny_models.pretrain.text import shipped_text_model

#: The LoRA must lower the loss on the held-out answers by at least this much (nats per token).
MIN_DROP_SHORT = 1.0  # a 30-step run (default suite; measured about 3)
MIN_DROP_FULL = 0.5  # the demo as shipped (160 steps; measured about 1.1)


class PlainConsole:
    width = 120

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: object = "", **_: object) -> None:
        self.lines.append(str(text))


def losses(text: str) -> tuple[float, float]:
    found = re.search(
        r"validation loss on held-out answers \((\d+) pairs\): base ([\d.]+) -> base \+ LoRA ([\d.]+)", text
    )
    assert found, text
    return float(found.group(2)), float(found.group(3))


def test_prepare_demo_writes_the_config_for_the_shipped_model(tmp_path: Path) -> None:
    config_path = prepare_demo(tmp_path, steps=7)
    config = yaml.safe_load(config_path.read_text("utf-8"))
    assert config["base_model"] == str(shipped_text_model()) and config["max_steps"] == 7
    assert Path(config["train_data_dir"]).is_file() and config["val_split"] > 0
    assert yaml.safe_load(prepare_demo(tmp_path).read_text("utf-8"))["max_steps"] == DEFAULT_STEPS


def test_held_out_records_are_the_trainers_validation_split(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from loratui.config import load_config
    from loratui.models.llm.batches import build_llm_data
    from loratui.models.llm.chat import choose_template

    config_path = prepare_demo(tmp_path)
    cfg = load_config(config_path).config
    train, held_out = split_records(Path(cfg.train_data_dir))
    assert len(train) + len(held_out) == 40 and len(held_out) == round(40 * cfg.val_split)
    tokenizer = AutoTokenizer.from_pretrained(cfg.base_model)
    template, _ = choose_template(tokenizer, cfg.chat_template)
    data = build_llm_data(
        cfg.train_data_dir,
        tokenizer,
        template,
        max_seq_len=cfg.max_seq_len,
        val_split=cfg.val_split,
        seed=cfg.seed,
    )
    answers = [tokenizer.decode(unit.input_ids, skip_special_tokens=True) for unit in data.val]
    assert all(any(r["response"][:10] in text for text in answers) for r in held_out)


def test_side_by_side_keeps_whole_chinese_answers() -> None:
    answer = "多喝温水，用淡盐水漱口，注意休息。如果伴有高烧，请到医院检查。"
    lines = side_by_side([("held out", "患者：喉咙痛，吞口水都疼。", "", answer)], width=80)
    joined = "".join(re.sub(r"[│┃ ]", "", line) for line in lines)
    assert all(len(line) <= 80 for line in lines)
    assert re.sub(r"[，。：]", "", answer)[:8] in re.sub(r"[，。：]", "", joined)


def test_a_short_run_lowers_the_held_out_answer_loss(tmp_path: Path) -> None:
    from loratui.demo.text_demo import run_demo

    console = PlainConsole()
    assert run_demo(tmp_path, steps=30, console=console) == 0
    text = "\n".join(console.lines)
    base, lora = losses(text)
    assert base - lora >= MIN_DROP_SHORT, text
    assert "held out" in text and "trained" in text and "base + LoRA" in text


@pytest.mark.slow
def test_the_demo_teaches_the_answers_within_two_minutes(tmp_path: Path) -> None:
    from loratui.demo.text_demo import run_demo

    console = PlainConsole()
    started = time.perf_counter()
    assert run_demo(tmp_path, console=console) == 0
    elapsed = time.perf_counter() - started
    text = "\n".join(console.lines)
    base, lora = losses(text)
    assert base - lora >= MIN_DROP_FULL, text
    assert elapsed <= 120, f"demo took {elapsed:.0f} s"
