"""LLM LoRA trainer on the tiny Llama: formats, events, exact resume, micro-batch equivalence, packing, options."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from llm_helpers import (
    StopAfter,
    adapter_tensors,
    make_config,
    make_job,
    max_diff,
    records,
    single_thread,
    write_jsonl,
)

from loratui.config import check_paths, load_config
from loratui.models.llm.adapter_files import OutputConflict
from loratui.models.llm.batches import build_llm_data, collate
from loratui.models.llm.loading import GGML_MESSAGE, ModelLoadError, load_base, resolve_base
from loratui.models.llm.loss import token_loss_sum
from loratui.runs.events import read_events
from loratui.train.llm.trainer import run_training

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["prompt_response", "alpaca", "chat", "sharegpt", "text"]
LORA_KEY = re.compile(r"^base_model\.model\..+\.lora_[AB]\.weight$")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture()
def qa_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))


def _events(job, kind: str) -> list[dict]:
    return [e for e in read_events(job.run.events_path) if e["type"] == kind]


def test_every_format_trains_with_events_samples_and_eval(tmp_path: Path, tiny_llama: Path) -> None:
    data = tmp_path / "data"
    for fmt in FORMATS:
        write_jsonl(data / f"{fmt}.jsonl", records(fmt, 3))
    cfg = make_config(
        tiny_llama,
        data,
        tmp_path,
        max_steps=3,
        val_split=0.2,
        sample_prompts=["头痛怎么办？"],
        sample_every_steps=2,
        max_seq_len=160,
    )
    job = make_job(cfg)
    result = run_training(job, console=False)
    assert result.state == "finished" and result.step == 3
    started = _events(job, "run_started")[0]
    assert started["samples"] == 15 and started["train_samples"] == 12 and started["val_samples"] == 3
    assert isinstance(_events(job, "eval")[-1]["eval_loss"], float)
    assert [e["step"] for e in _events(job, "sample")] == [2, 3] and _events(job, "sample")[0][
        "text"
    ] is not None
    assert (
        (job.run.samples_dir / "step-000002.txt").read_text(encoding="utf-8").startswith("### prompt\n头痛")
    )
    steps = _events(job, "step")
    assert [e["step"] for e in steps] == [1, 2, 3] and all(e["tokens_per_s"] > 0 for e in steps)
    export = _events(job, "export")[-1]
    assert (
        Path(export["path"]) == (tmp_path / "adapter").resolve()
        and "PeftModel.from_pretrained" in export["usage"]
    )
    assert any(job.run.logs_dir.iterdir())  # TensorBoard
    assert json.loads(job.run.status_path.read_text())["state"] == "finished"

    adapter = tmp_path / "adapter"
    keys = adapter_tensors(adapter).keys()
    assert keys and all(LORA_KEY.match(k) for k in keys)  # what llama.cpp's convert_lora_to_gguf.py accepts
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama.resolve())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == 4
    assert config["target_modules"] == sorted(  # the family default: every attention and MLP linear layer
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert not config.get("modules_to_save")
    assert (adapter / "chat_template.jinja").read_text() == result.tokenizer.chat_template
    assert "PeftModel.from_pretrained" in (adapter / "README.md").read_text()


def test_adapter_reloads_with_peft_and_gives_the_training_model_output(
    tmp_path: Path, tiny_llama: Path, qa_file
):
    from peft import PeftModel

    result = run_training(make_job(make_config(tiny_llama, qa_file, tmp_path, max_steps=3)), console=False)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90, 100]])
    result.model.eval()
    with torch.no_grad():
        trained = result.model(input_ids=ids).logits
        base, _, _ = load_base(str(tiny_llama))
        plain = base(input_ids=ids).logits.clone()
        loaded = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
        again = loaded(input_ids=ids).logits
    assert (trained - plain).abs().max() > 1e-3  # the adapter changed something
    torch.testing.assert_close(again, trained, rtol=0, atol=1e-6)


def _three_segments(tiny_llama: Path, data: Path, out: Path, **kw) -> tuple[dict, list[dict]]:
    """Stop after 2 steps, resume and stop after 2 more, resume to the end (6 steps)."""
    cfg = make_config(tiny_llama, data, out, max_steps=6, **kw)
    job = make_job(cfg)
    assert run_training(job, stop=StopAfter(2), console=False).state == "stopped"
    first = job.run.latest_checkpoint()
    assert first.name == "step-2"
    job2 = make_job(cfg, resume_from=first, run=job.run)
    assert run_training(job2, stop=StopAfter(2), console=False).state == "stopped"
    second = job.run.latest_checkpoint()
    assert second.name == "step-4"
    result = run_training(make_job(cfg, resume_from=second, run=job.run), console=False)
    assert result.state == "finished" and result.step == 6
    return adapter_tensors(result.adapter_dir), read_events(job.run.events_path)


def test_resume_twice_equals_an_uninterrupted_run(tmp_path: Path, tiny_llama: Path, qa_file: Path) -> None:
    options = {
        "gradient_accumulation_steps": 2,
        "lora_dropout": 0.1,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "max_grad_norm": 0.5,
    }
    straight = run_training(
        make_job(make_config(tiny_llama, qa_file, tmp_path / "a", max_steps=6, **options)), console=False
    )
    resumed, events = _three_segments(tiny_llama, qa_file, tmp_path / "b", **options)
    assert max_diff(adapter_tensors(straight.adapter_dir), resumed) <= 1e-6
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]  # no step counted twice or skipped
    assert [e["type"] for e in events].count("run_stopped") == 2


def test_micro_batches_give_the_same_update(tmp_path: Path, tiny_llama: Path, qa_file: Path) -> None:
    whole = run_training(
        make_job(make_config(tiny_llama, qa_file, tmp_path / "a", batch_size=4)), console=False
    )
    split = run_training(
        make_job(
            make_config(tiny_llama, qa_file, tmp_path / "b", batch_size=2, gradient_accumulation_steps=2)
        ),
        console=False,
    )
    a, b = adapter_tensors(whole.adapter_dir), adapter_tensors(split.adapter_dir)
    assert max_diff(a, b) <= 1e-5
    assert max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k) > 1e-4  # it did train


def test_packed_rows_give_the_same_token_losses(tmp_path: Path, tiny_llama: Path) -> None:
    model, tok, _ = load_base(str(tiny_llama))
    path = write_jsonl(tmp_path / "short.jsonl", records("chat", 8))
    plain = build_llm_data(path, tok, tok.chat_template, max_seq_len=400)
    packed = build_llm_data(path, tok, tok.chat_template, max_seq_len=400, packing=True)
    assert len(packed.train) < len(plain.train)
    with torch.no_grad():
        loss_plain = sum(float(token_loss_sum(model, collate([u], tok.pad_token_id))) for u in plain.train)
        loss_packed = float(token_loss_sum(model, collate(packed.train, tok.pad_token_id)))
    assert plain.stats["target_tokens"] == packed.stats["target_tokens"]
    assert loss_packed == pytest.approx(loss_plain, rel=1e-5)


def test_options_checkpointing_all_linear_rslora_bf16_packing(tmp_path: Path, tiny_llama: Path, qa_file):
    cfg = make_config(
        tiny_llama,
        qa_file,
        tmp_path,
        gradient_checkpointing=True,
        target_modules="all-linear",
        use_rslora=True,
        mixed_precision="bf16",
        packing=True,
        max_seq_len=256,
        lr_scheduler="linear",
        lr_warmup_steps=1,
        train_on_prompt=True,
        save_steps=1,
        keep_last_n=2,
    )
    job = make_job(cfg)
    result = run_training(job, console=False)
    assert result.state == "finished"
    keys = adapter_tensors(result.adapter_dir).keys()
    assert any("mlp.gate_proj.lora_A" in k for k in keys) and all(LORA_KEY.match(k) for k in keys)
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert config["use_rslora"] is True
    assert [p.name for p in job.run.checkpoints()] == ["step-2", "step-3"]  # rotation keeps 2
    assert _events(job, "run_started")[0]["precision"] == "bf16"


def test_init_lora_continues_from_an_adapter(tmp_path: Path, tiny_llama: Path, qa_file: Path) -> None:
    first = run_training(
        make_job(make_config(tiny_llama, qa_file, tmp_path / "a", max_steps=2)), console=False
    )
    cfg = make_config(
        tiny_llama,
        qa_file,
        tmp_path / "b",
        max_steps=1,
        learning_rate=1e-12,
        init_lora=str(first.adapter_dir),
    )
    again = run_training(make_job(cfg), console=False)
    assert max_diff(adapter_tensors(first.adapter_dir), adapter_tensors(again.adapter_dir)) < 1e-6


def test_adapter_of_another_run_is_not_replaced(tmp_path: Path, tiny_llama: Path, qa_file: Path) -> None:
    cfg = make_config(tiny_llama, qa_file, tmp_path, max_steps=1)
    run_training(make_job(cfg), console=False)
    before = adapter_tensors(tmp_path / "adapter")
    with pytest.raises(OutputConflict, match="already holds an adapter from run .*--overwrite"):
        run_training(make_job(cfg), console=False)
    assert max_diff(before, adapter_tensors(tmp_path / "adapter")) == 0
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(OutputConflict, match="not an adapter folder"):
        run_training(
            make_job(make_config(tiny_llama, qa_file, tmp_path, output_dir=str(tmp_path / "notes"))),
            console=False,
        )
    result = run_training(make_job(cfg, overwrite=True), console=False)
    assert result.state == "finished" and (tmp_path / "notes" / "keep.txt").exists()


def test_seed_medical_qa_config(tmp_path: Path, tiny_llama: Path, qa_file: Path, monkeypatch) -> None:
    example = REPO / "examples" / "llm_medical_qa.yaml"
    monkeypatch.chdir(tmp_path)
    ggml = tmp_path / "models" / "llama-2-7b-chat.ggmlv3.q4_0.bin"
    ggml.parent.mkdir()
    ggml.write_bytes(b"tjgg" + bytes(64))
    shutil.copytree(qa_file.parent, tmp_path / "data" / "medical_qa")
    resolved = load_config(example)
    assert [p.key for p in check_paths(resolved)] == ["base_model"]
    assert "GGML v3 files cannot be trained" in str(check_paths(resolved)[0])
    with pytest.raises(ModelLoadError) as err:  # the loader says the same when reached directly
        resolve_base(resolved.config.base_model)
    assert str(err.value) == GGML_MESSAGE.format(path=resolved.config.base_model)
    assert "convert the model to GGUF" in str(err.value) and "Hugging Face weights" in str(err.value)
    with pytest.raises(ModelLoadError, match="GGML v3 files cannot be trained"):
        run_training(make_job(resolved.config), console=False)

    fixed = load_config(
        example, overrides=["max_steps=2", "max_seq_len=160"], flags={"base_model": str(tiny_llama)}
    )
    assert not check_paths(fixed)
    cfg = fixed.config
    assert (cfg.lora_rank, cfg.epochs, cfg.task_type) == (16, 15, "text-generation")
    result = run_training(make_job(cfg), console=False)
    assert result.state == "finished" and result.data.stats["samples"] == 8


def test_tokenizer_without_pad_token_trains(tmp_path: Path, tiny_llama_nopad: Path, qa_file: Path) -> None:
    result = run_training(
        make_job(make_config(tiny_llama_nopad, qa_file, tmp_path, max_steps=2)), console=False
    )
    assert result.state == "finished" and result.tokenizer.pad_token_id == result.tokenizer.eos_token_id


def test_8bit_adamw_without_bitsandbytes_says_how_to_install(
    tmp_path: Path, tiny_llama: Path, qa_file: Path, monkeypatch
):
    from loratui.models import quant
    from loratui.train.loop.optim import MissingDependency

    monkeypatch.setattr(quant, "bitsandbytes_version", lambda: None)  # as on a machine without it
    with pytest.raises(MissingDependency, match=r'bitsandbytes: pip install "loratui\[quant\]"'):
        run_training(
            make_job(make_config(tiny_llama, qa_file, tmp_path, optimizer="adamw8bit")), console=False
        )
