"""`loratui export` for LLM runs: PEFT adapter folders and merged models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llm_helpers import adapter_tensors, make_config, make_job, max_diff, records, single_thread, write_jsonl

from loratui.cli.cmd_export import run_text_export
from loratui.export.llm_export import export_adapter, resolve_source
from loratui.export.result import UnusableExportRequest
from loratui.models.llm.loading import load_base
from loratui.train.llm.trainer import run_training


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path):
    tmp = tmp_path_factory.mktemp("llm_export")
    data = write_jsonl(tmp / "qa.jsonl", records("chat", 6))
    cfg = make_config(tiny_llama, data, tmp, max_steps=3, save_steps=2, max_seq_len=160)
    job = make_job(cfg)
    result = run_training(job, console=False)
    return job.run.path, result.adapter_dir


class Lines:
    """A console stand-in that keeps printed lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str = "", **_: object) -> None:
        self.lines.append(str(text))


IDS = torch.tensor([[1, 40, 41, 300, 301, 302, 500, 7]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def test_run_exports_the_same_adapter_as_training(trained, tmp_path: Path) -> None:
    run, adapter = trained
    out = Lines()
    assert run_text_export(run, out=tmp_path / "a", console=out) == 0
    assert max_diff(adapter_tensors(adapter), adapter_tensors(tmp_path / "a")) == 0
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == (
        adapter / "chat_template.jinja"
    ).read_text()
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text()) == json.loads(
        (adapter / "adapter_config.json").read_text()
    )
    assert any(line.startswith("use it: from peft import PeftModel") for line in out.lines)
    assert run_text_export(run, out=tmp_path / "a", console=Lines()) == 1  # no silent replacement ...
    assert run_text_export(run, out=tmp_path / "a", overwrite=True, console=Lines()) == 0  # ... unless asked
    ckpt = run / "checkpoints" / "step-2"
    assert resolve_source(ckpt).step == 2
    assert run_text_export(ckpt, dtype="fp16", console=Lines()) == 0
    fp16 = adapter_tensors(run / "exports" / "step-2-adapter-fp16")
    assert all(t.dtype == torch.float16 for t in fp16.values())


def test_merged_model_matches_base_plus_adapter(trained, tmp_path: Path, tiny_llama: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, adapter = trained
    assert run_text_export(adapter, merge=True, dtype="fp32", out=tmp_path / "m32", console=Lines()) == 0
    base, _, _ = load_base(str(tiny_llama))
    expected = _logits(PeftModel.from_pretrained(base, str(adapter)))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m32", local_files_only=True)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)
    assert any((tmp_path / "m32").glob("*.safetensors"))
    tok = AutoTokenizer.from_pretrained(tmp_path / "m32", local_files_only=True)
    assert tok.chat_template == (adapter / "chat_template.jinja").read_text()

    assert run_text_export(run, merge=True, dtype="bf16", console=Lines()) == 0
    half = AutoModelForCausalLM.from_pretrained(run / "exports" / "merged-bf16", local_files_only=True)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(half), expected, rtol=0.05, atol=0.05)


def test_bad_export_requests(trained, tmp_path: Path) -> None:
    run, _ = trained
    out = Lines()
    assert run_text_export(run, fmt="kohya", console=out) == 2 and "PEFT folder" in out.lines[-1]
    assert run_text_export(run, dtype="int3", console=out) == 2
    assert run_text_export(tmp_path, console=out) == 1 and "not a run directory" in out.lines[-1]


def test_export_returns_what_it_wrote_and_refuses_options_for_images(trained, tmp_path: Path) -> None:
    run, adapter = trained
    exported = export_adapter(run, out=tmp_path / "b")
    assert exported.kind == "adapter" and exported.path == tmp_path / "b"
    assert (exported.path / "adapter_model.safetensors").is_file()
    assert exported.usage.startswith("from peft import PeftModel") and str(exported.path) in exported.usage
    with pytest.raises(UnusableExportRequest, match="--format peft"):
        export_adapter(run, fmt="diffusers")
