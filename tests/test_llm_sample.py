"""`loratui sample` for LLMs: the training chat template, adapters with weights, base vs LoRA."""

from __future__ import annotations

from pathlib import Path

import pytest
from llm_helpers import make_config, make_job, records, single_thread, write_jsonl

from loratui.cli.cmd_sample import run_text_sample
from loratui.sample.llm_sample import (
    generate_answer,
    load_with_adapters,
    parse_lora,
    sample_text,
)
from loratui.train.llm.trainer import run_training


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    tmp = tmp_path_factory.mktemp("llm_sample")
    data = write_jsonl(tmp / "qa.jsonl", records("prompt_response", 8))
    cfg = make_config(
        tiny_llama,
        data,
        tmp,
        max_steps=4,
        learning_rate=5e-2,
        chat_template=None,
        target_modules=["q_proj", "v_proj", "lm_head"],
        max_seq_len=160,
    )
    return run_training(make_job(cfg), console=False).adapter_dir


class Plain:
    """A non-terminal console that keeps what is printed."""

    is_terminal = False

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: object = "", **_: object) -> None:
        self.lines.append(str(text))


def test_parse_lora_specs(tmp_path: Path) -> None:
    assert parse_lora("out/adapter") == parse_lora("out/adapter:1")
    assert parse_lora("out/adapter:0.5").weight == 0.5
    (tmp_path / "named").mkdir()
    assert parse_lora("named:0.8", tmp_path).path == tmp_path / "named"


def test_compare_prints_base_and_adapter_answers(adapter: Path, tiny_llama: Path) -> None:
    out = Plain()
    code = run_text_sample(
        console=out,
        base=str(tiny_llama),
        lora=[str(adapter)],
        prompt="患者：头痛三天，体温正常，该吃什么药？",
        compare=True,
        max_new_tokens=12,
    )
    assert code == 0
    assert out.lines[0] == "--- base ---" and out.lines[2] == "--- base + LoRA ---"
    assert out.lines[1] != out.lines[3]  # the adapter changes the answer
    sample = sample_text(
        base=str(tiny_llama), lora=[str(adapter)], prompt="hi", compare=True, max_new_tokens=6
    )
    assert sample.prompt == "hi" and sample.base_answer is not None and sample.answer != sample.base_answer
    assert sample_text(base=str(tiny_llama), prompt="hi", compare=True, max_new_tokens=6).base_answer is None


def test_weight_zero_is_the_base_model_and_template_comes_from_the_adapter(adapter: Path, tiny_llama: Path):
    base, tok, template = load_with_adapters(str(tiny_llama), [])
    plain = generate_answer(base, tok, template, "What helps a sore throat?", max_new_tokens=10)
    model, tok2, template2 = load_with_adapters(str(tiny_llama), [parse_lora(f"{adapter}:0")])
    assert template2 == (adapter / "chat_template.jinja").read_text()
    assert generate_answer(model, tok2, template2, "What helps a sore throat?", max_new_tokens=10) == plain
    sampled = generate_answer(
        model, tok2, template2, "hi", max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3
    )
    assert sampled == generate_answer(
        model, tok2, template2, "hi", max_new_tokens=8, temperature=0.9, top_p=0.9, seed=3
    )


def test_bad_adapter_path_is_reported(tmp_path: Path, tiny_llama: Path) -> None:
    out = Plain()
    assert run_text_sample(console=out, base=str(tiny_llama), lora=[str(tmp_path)], prompt="hi") == 1
    assert "not a PEFT adapter folder" in out.lines[-1]
    assert run_text_sample(console=out, base=str(tmp_path / "nope"), prompt="hi") == 1
    assert "base model not found" in out.lines[-1]
