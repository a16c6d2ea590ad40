"""Code shipped with a model folder (`auto_map`) never runs without --trust-remote-code, and no command asks on
stdin: `loratui check`, `caption` and `sample` on such a folder, run as real processes fed "y" on stdin."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import pattern, save

REPO = Path(__file__).resolve().parents[1]


def _with_code(src: Path, dest: Path, marker: Path) -> Path:
    """A copy of `src` whose config and tokenizer point at Python code that writes `marker` when imported."""
    shutil.copytree(src, dest)
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json"):
        file = dest / name
        if not file.is_file():
            continue
        data = json.loads(file.read_text())
        data["auto_map"] = {
            "AutoConfig": "shipped.ShippedConfig",
            "AutoModelForCausalLM": "shipped.ShippedModel",
            "AutoTokenizer": ["shipped.ShippedTokenizer", None],
        }
        if name == "config.json":
            data["model_type"] = "shipped"
        file.write_text(json.dumps(data))
    (dest / "shipped.py").write_text(
        "import pathlib\n"
        f"pathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast\n"
        "class ShippedConfig(LlamaConfig):\n    model_type = 'shipped'\n"
        "class ShippedModel(LlamaForCausalLM):\n    config_class = ShippedConfig\n"
        "class ShippedTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    return dest


def _loratui(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "hf_modules"),
    }
    return subprocess.run(
        [sys.executable, "-m", "loratui", *args],
        cwd=tmp_path,
        env=env,
        input="y\ny\ny\n",  # what a user (or `yes |`) answering a prompt would send
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture()
def shipped_llama(tmp_path: Path, tiny_llama: Path) -> tuple[Path, Path]:
    marker = tmp_path / "MARKER"
    return _with_code(tiny_llama, tmp_path / "shipped-llama", marker), marker


def test_check_never_runs_shipped_tokenizer_code(tmp_path: Path, shipped_llama: tuple[Path, Path]) -> None:
    model, marker = shipped_llama
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n{"text": "more text"}\n')
    proc = _loratui(tmp_path, "check", str(data), "--tokenizer", str(model))
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 0, out
    assert not marker.exists(), "model code ran"
    assert "[y/N]" not in out and "Do you wish" not in out
    assert "ships its own code (auto_map in config.json)" in out and "--trust-remote-code" in out
    assert "approximate count" in out and "if you trust it, pass --trust-remote-code" in out


def test_check_with_a_config_base_model_never_runs_code(
    tmp_path: Path, shipped_llama: tuple[Path, Path]
) -> None:
    model, marker = shipped_llama
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    config = tmp_path / "c.yaml"
    config.write_text(f"task_type: text-generation\nbase_model: {model}\ntrain_data_dir: {data}\n")
    proc = _loratui(tmp_path, "check", "--config", str(config))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not marker.exists()
    assert "--trust-remote-code" in proc.stdout


def test_check_trust_remote_code_is_the_way_to_allow_it(
    tmp_path: Path, shipped_llama: tuple[Path, Path]
) -> None:
    model, marker = shipped_llama
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    proc = _loratui(tmp_path, "check", str(data), "--tokenizer", str(model), "--trust-remote-code")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert marker.exists()  # the folder really carries code: allowed, it runs
    assert "counted with the tokenizer" in proc.stdout


def test_sample_refuses_shipped_code_in_one_line(tmp_path: Path, shipped_llama: tuple[Path, Path]) -> None:
    model, marker = shipped_llama
    proc = _loratui(tmp_path, "sample", "--base", str(model), "--prompt", "hi", "--max-new-tokens", "2")
    out = " ".join((proc.stdout + proc.stderr).split())  # rich wraps long lines
    assert proc.returncode != 0
    assert not marker.exists()
    assert "Traceback" not in out and "[y/N]" not in out
    assert "auto_map in config.json" in out and "--trust-remote-code" in out


def test_caption_refuses_shipped_code(tmp_path: Path, tiny_blip: Path) -> None:
    marker = tmp_path / "MARKER"
    model = _with_code(tiny_blip, tmp_path / "shipped-blip", marker)
    images = tmp_path / "images"
    save(pattern(), images / "a.png")
    proc = _loratui(tmp_path, "caption", str(images), "--model", str(model), "--device", "cpu")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out
    assert not marker.exists()
    assert "Traceback" not in out and "[y/N]" not in out
    assert "ships its own model code (auto_map in config.json)" in out and "--trust-remote-code" in out
    assert not (images / "metadata.csv").exists()
