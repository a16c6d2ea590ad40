"""Damaged or unreadable inputs get a one-line message, never a traceback: unreadable dataset files, truncated
LoRA files, the wrong kind of LoRA for `sample`, safetensors/JSON headers nested 100k levels, an enormous seed."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from sd_helpers import make_image_dataset
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import ConfigError, load_config
from loratui.config.base_model import inspect_base_model, read_safetensors_header
from loratui.data.check import run_checks

DEEP = 100_000


def _invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result, " ".join(result.output.split())  # rich wraps long lines


def _deny(monkeypatch: pytest.MonkeyPatch, target: Path) -> None:
    """`target` raises PermissionError when read, as a file without read permission does (tests run as root,
    which chmod does not stop)."""
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.resolve() == target.resolve():
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)


def _kohya_lora(path: Path) -> Path:
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {
        f"{prefix}.lora_down.weight": torch.randn(4, 32),
        f"{prefix}.lora_up.weight": torch.randn(32, 4),
        f"{prefix}.alpha": torch.tensor(4.0),
    }
    save_file(tensors, str(path))
    return path


def _llm_adapter_file(path: Path) -> Path:
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file(
        {f"{key}.lora_A.weight": torch.randn(4, 64), f"{key}.lora_B.weight": torch.randn(64, 4)}, str(path)
    )
    return path


def _truncate(path: Path, by: int = 64) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - by])
    return path


def _deep_safetensors(path: Path) -> Path:
    header = b'{"__metadata__":' + b"[" * DEEP + b"]" * DEEP + b"}"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    return path


# --- unreadable dataset files ----------------------------------------------------------------------------


def test_unreadable_jsonl_is_an_error_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "good.jsonl").write_text('{"prompt": "a", "response": "b"}\n' * 3)
    locked = data / "locked.jsonl"
    locked.write_text('{"prompt": "c", "response": "d"}\n')
    _deny(monkeypatch, locked)
    result, out = _invoke("check", str(data))
    assert result.exit_code == 1, out
    assert "file_unreadable" in out and "locked.jsonl" in out and "Permission denied" in out
    assert "chmod" in out  # what to do
    report = run_checks(data)
    assert report.summary["records"] == 3  # the readable file is still checked


def test_unreadable_metadata_csv_is_an_error_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_dataset(tmp_path / "imgs", n=3, metadata=True)
    _deny(monkeypatch, root / "metadata.csv")
    result, out = _invoke("check", str(root))
    assert result.exit_code == 1, out
    assert "file_unreadable" in out and "metadata.csv" in out and "Permission denied" in out


def test_unreadable_caption_file_is_an_error_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_image_dataset(tmp_path / "imgs", n=3, metadata=False)
    _deny(monkeypatch, root / "img00.txt")
    result, out = _invoke("check", str(root))
    assert result.exit_code == 1, out
    assert "file_unreadable" in out and "img00.txt" in out


# --- truncated LoRA files --------------------------------------------------------------------------------


def test_export_of_a_truncated_lora_file_says_so(tmp_path: Path) -> None:
    lora = _truncate(_kohya_lora(tmp_path / "style.safetensors"))
    result, out = _invoke("export", str(lora), "--format", "diffusers", "-o", str(tmp_path / "out"))
    assert result.exit_code == 1, out
    assert "style.safetensors is not a complete .safetensors file" in out and "export it again" in out
    assert not (tmp_path / "out").exists()


def test_export_of_a_truncated_llm_adapter_says_so(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    _truncate(_llm_adapter_file(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    result, out = _invoke("export", str(adapter), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1, out
    assert "adapter_model.safetensors is not a complete .safetensors file" in out


# --- sample --lora with the wrong kind of LoRA -------------------------------------------------------------


def test_sample_refuses_an_llm_adapter_file_on_an_image_base(tmp_path: Path, tiny_sd15: Path) -> None:
    adapter = _llm_adapter_file(tmp_path / "adapter_model.safetensors")
    args = [
        "sample",
        "--base",
        str(tiny_sd15),
        "--prompt",
        "a cat",
        "--steps",
        "1",
        "-o",
        str(tmp_path / "x.png"),
    ]
    result, out = _invoke(*args, "--lora", str(adapter))
    assert result.exit_code == 1, out
    assert "is a PEFT adapter for a text model" in out and "--base" in out
    assert not (tmp_path / "x.png").exists()

    folder = adapter.parent / "peft"
    folder.mkdir()
    adapter.rename(folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text("{}")
    result, out = _invoke(*args, "--lora", str(folder))
    assert result.exit_code == 1, out
    assert "not found" not in out and "is a PEFT adapter for a text model" in out

    result, out = _invoke(*args, "--lora", str(_truncate(_kohya_lora(tmp_path / "cut.safetensors"))))
    assert result.exit_code == 1 and "cut.safetensors is not a complete .safetensors file" in out


# --- headers nested 100k levels ----------------------------------------------------------------------------


def test_deeply_nested_safetensors_header_is_a_value_error(tmp_path: Path) -> None:
    from loratui.models.sd.kohya import LoraFileError, read_lora_file

    deep = _deep_safetensors(tmp_path / "deep.safetensors")
    with pytest.raises(ValueError, match="nests too deeply"):
        read_safetensors_header(deep)
    info = inspect_base_model(str(deep))
    assert info.kind == "unknown" and "nests too deeply" in " ".join(info.notes)
    with pytest.raises(LoraFileError, match="deep.safetensors"):
        read_lora_file(deep)
    result, out = _invoke("export", str(deep))
    assert result.exit_code == 2 and "deep.safetensors is not a run directory" in out


def test_deeply_nested_json_records_are_findings(tmp_path: Path) -> None:
    deep = "[" * DEEP + "]" * DEEP
    (tmp_path / "a.jsonl").write_text('{"prompt": "a", "response": "b"}\n{"prompt": ' + deep + "}\n")
    (tmp_path / "b.json").write_text("[" + deep + "]")
    report = run_checks(tmp_path)
    details = [e.detail for f in report.findings for e in f.examples]
    assert sum("nests too deeply" in d for d in details) == 2, details
    assert report.exit_code == 1


def test_deeply_nested_adapter_config_is_refused(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    _llm_adapter_file(adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text('{"x": ' + "[" * DEEP + "]" * DEEP + "}")
    result, out = _invoke("export", str(adapter), "-o", str(tmp_path / "out"))
    assert result.exit_code == 1, out
    assert "adapter_config.json is not valid JSON" in out and "nests too deeply" in out


# --- a seed too large for the libraries --------------------------------------------------------------------


def test_huge_seed_is_refused_by_the_config(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"task_type: text-generation\nbase_model: {tmp_path}\ntrain_data_dir: {tmp_path}\n")
    with pytest.raises(ConfigError) as err:
        load_config(config, overrides=["seed=99999999999999999999999"])
    assert "`seed`: expected less than or equal to 4294967295" in err.value.render()
    assert load_config(config, overrides=["seed=4294967295"]).config.seed == 4294967295
    result, out = _invoke("train", "--config", str(config), "--set", "seed=-1", "--dry-run")
    assert result.exit_code != 0 and "`seed`: expected greater than or equal to 0" in out
