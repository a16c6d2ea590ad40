"""`bench/gpu_check.py --smoke`: every section of the GPU check runs on the CPU with tiny models and reports
rows with finite numbers; bad arguments get a one-line error."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
SECTIONS = ("llm", "sd", "flux", "oom", "recommend_8gb", "precision")
# per section: numbers every measured row must carry
REQUIRED = {
    "llm": ("predicted", "predicted_allocated_basis", "allocated", "rate", "bare_rate", "speed_ratio"),
    "sd": ("predicted", "predicted_allocated_basis", "allocated", "rate", "bare_rate", "speed_ratio"),
    "flux": (
        "predicted",
        "predicted_allocated_basis",
        "predicted_run",
        "allocated",
        "rate",
        "first_loss",
        "last_loss",
    ),
    "oom": ("recovery_s", "ordinary_step_s", "steps_done"),
    "recommend_8gb": ("predicted", "measured", "steps_done"),
    "precision": ("first_loss", "last_loss", "steps_done"),
}


def _run(*args: str, timeout: float = 480) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=timeout,
    )


def test_smoke_reports_every_section_with_finite_numbers(tmp_path: Path) -> None:
    out = tmp_path / "report"
    proc = _run("--smoke", "--out", str(out), "--work", str(tmp_path / "work"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "optional packages: " in proc.stdout and "bitsandbytes" in proc.stdout
    result = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    markdown = (out / "gpu_check.md").read_text(encoding="utf-8")
    assert result["smoke"] is True and result["passed"] is True
    assert result["date"] and result["device"]["name"]
    assert set(result["packages"]) == {"diffusers", "pydantic", "bitsandbytes"}
    by_name = {s["name"]: s for s in result["sections"]}
    assert tuple(by_name) == SECTIONS
    for name, section in by_name.items():
        assert section["status"] == "passed", (name, section["error"], section["notes"])
        measured = [r for r in section["rows"] if r.get("status") == "ok"]
        assert measured, f"{name}: no measured rows"
        for row in measured:
            for key in REQUIRED[name]:
                value = row.get(key)
                assert isinstance(value, int | float) and math.isfinite(value), (name, key, row)
        judged = [c for c in section["checks"] if c["judged"]]
        assert judged and all(c["passed"] for c in judged), (name, section["checks"])
        assert f"#### {section['title']}" in markdown
    # every configuration of the GPU run has its row (QLoRA is skipped on the CPU, with the reason)
    llm = by_name["llm"]["rows"]
    assert {(r["method"], r["status"].split(":")[0]) for r in llm} >= {("lora", "ok"), ("qlora", "skipped")}
    assert any(r["checkpointing"] for r in by_name["sd"]["rows"]) and any(
        not r["checkpointing"] for r in by_name["sd"]["rows"]
    )
    assert {r["model"] for r in by_name["sd"]["rows"]} == {"tiny SD1.5 layout", "tiny SDXL layout"}
    # Flux: bf16 and fp8 base, each with and without block swap, in the JSON and in the markdown table
    flux = by_name["flux"]["rows"]
    assert {(r["base"], r["blocks_to_swap"] > 0) for r in flux} == {
        (base, swapped) for base in ("bf16", "fp8") for swapped in (False, True)
    }
    for row in flux:
        assert f"| {row['resolution']} | {row['base']} | {row['blocks_to_swap']} |" in markdown
        if row["blocks_to_swap"]:
            # blocks_to_swap 2 counts as kohya does: 1 double + 1 single block, swapped by the trainer as planned
            trainer, planner = row["swapped"].split(" / ")
            assert math.isfinite(row["rate_vs_unswapped"]) and trainer == planner == "1+1"
    same_loss = [c for c in by_name["flux"]["checks"] if "loss equals the unswapped" in c["check"]]
    assert len(same_loss) == 2 and all(c["passed"] for c in same_loss)
    variants = {r["variant"]: r["status"] for r in by_name["precision"]["rows"]}
    assert variants["fp16 + loss scaling"] == variants["bf16"] == "ok"
    from loratui.models.quant import bitsandbytes_problem

    if bitsandbytes_problem("cpu", "QLoRA") is None:  # bitsandbytes >= 0.50 trains both on the CPU
        assert variants["8-bit AdamW"] == variants["QLoRA (NF4)"] == "ok"
    elif (
        importlib.util.find_spec("bitsandbytes") is None
    ):  # the `quant` extra is optional: skipped, saying why
        assert variants["8-bit AdamW"] == variants["QLoRA (NF4)"] == "skipped: bitsandbytes not installed"
    assert "not GPU figures" in markdown


def test_refuses_to_overwrite_a_report_and_unknown_sections(tmp_path: Path) -> None:
    (tmp_path / "gpu_check.md").write_text("earlier report\n", encoding="utf-8")
    proc = _run("--smoke", "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--overwrite" in proc.stderr, proc.stderr
    assert (tmp_path / "gpu_check.md").read_text(encoding="utf-8") == "earlier report\n"

    proc = _run("--smoke", "--only", "llm,nope", "--out", str(tmp_path / "x"), timeout=60)
    assert proc.returncode == 2
    assert "unknown section nope" in proc.stderr and "Traceback" not in proc.stderr


def test_without_a_gpu_asks_for_smoke(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        return  # the real check would start here
    proc = _run("--out", str(tmp_path / "report"), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA GPU here; run with --smoke" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "report").exists()
