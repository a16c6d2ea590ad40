"""Smaller traps: booleans as numbers, YAML alias bombs, a moved event log, a stop during start-up, and an
adapter made for another base model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from llm_helpers import make_config, records, write_jsonl
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.cli.launch import follow_plain
from loratui.config import ConfigError, ResolvedConfig, load_config
from loratui.runs.events import EventReader, EventWriter, read_events
from loratui.runs.rundir import create_run_dir
from loratui.runs.status import EXIT_STOPPED, RunStatus
from loratui.train.process.launch import prepare_run, start_worker

TIMEOUT_S = 180


def _config(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"task_type: text-generation\nbase_model: {tmp_path}\ntrain_data_dir: {tmp_path}\n{extra}"
    )
    return path


# --- booleans are not numbers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("batch_size=true", "`batch_size`: expected a whole number, not true"),
        ("max_steps=false", "`max_steps`: expected a whole number, not false"),
        ("learning_rate=true", "`learning_rate`: expected a number, not true"),
    ],
)
def test_a_boolean_is_not_a_number(tmp_path: Path, override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(_config(tmp_path), overrides=[override])
    assert expected in err.value.render()


def test_a_boolean_in_the_file_is_not_a_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="c.yaml:4: `batch_size`: expected a whole number, not true"):
        load_config(_config(tmp_path, "batch_size: yes\n"))
    assert load_config(_config(tmp_path, "batch_size: 3\nflip_aug: true\n")).config.batch_size == 3


# --- YAML alias bombs ------------------------------------------------------------------------------------


def _bomb(levels: int, use: str) -> str:
    names = "abcdefghi"
    lines = ["anchors:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [
        f"  {names[i]}: &{names[i]} [" + ",".join([f"*{names[i - 1]}"] * 9) + "]" for i in range(1, levels)
    ]
    return "\n".join(lines) + f"\nsample_prompts: *{use}\n"


def test_an_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    config = _config(tmp_path, _bomb(9, "i"))  # 9**9 = 387 million strings once expanded
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert time.perf_counter() - started < 5
    text = err.value.render()
    assert len(text) < 2000
    assert (
        "`sample_prompts`: the value expands through YAML anchors/aliases to more than 100,000 items" in text
    )


def test_a_bad_value_is_echoed_at_most_200_characters(tmp_path: Path) -> None:
    config = _config(tmp_path, _bomb(3, "c"))  # 729 strings: allowed, but not a list of prompts
    with pytest.raises(ConfigError) as err:
        load_config(config)
    lines = [line for line in err.value.render().splitlines() if "`sample_prompts`" in line]
    assert lines and all(len(line.split(": ", 2)[-1]) < 260 for line in lines)  # "expected text (got ...)"
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--set", "seed=[*x]", "--dry-run"])
    assert result.exit_code != 0 and "Traceback" not in result.output


def test_an_alias_bomb_in_set_is_refused(tmp_path: Path) -> None:
    bomb = (
        "[&a [x,x,x,x,x,x,x,x,x,x], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b],"
    )
    bomb += (
        " &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d], [*e,*e,*e,*e,*e,*e,*e,*e]]"
    )
    with pytest.raises(ConfigError, match="expands through YAML anchors/aliases"):
        load_config(_config(tmp_path), overrides=[f"sample_prompts={bomb}"])


# --- the outcome when events.jsonl was moved mid-run ---------------------------------------------------------


class _Out:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: object = "", **_: object) -> None:
        self.lines.append(str(text))


@pytest.mark.parametrize(("state", "code"), [("finished", 0), ("stopped", EXIT_STOPPED), ("failed", 1)])
def test_follow_reads_the_outcome_from_status_when_the_log_moved(
    tmp_path: Path, state: str, code: int
) -> None:
    run = create_run_dir(tmp_path / "runs", "r")
    with EventWriter(run.events_path) as events:
        events.write("step", 1, loss=1.0)
    reader = EventReader(run.events_path)
    reader.poll()
    run.events_path.rename(run.events_path.with_name("events.jsonl.1"))  # `mv events.jsonl events.jsonl.1`
    RunStatus(state=state, step=3, total_steps=3).write(run.status_path)
    worker = subprocess.Popen([sys.executable, "-c", "pass"])
    worker.wait()
    out = _Out()
    assert follow_plain(run, worker, out, reader) == code
    text = "\n".join(out.lines)
    if state == "failed":
        assert "training did not finish" in text
    else:
        assert f"{state} (from {run.status_path}" in text and "did not finish" not in text


# --- SIGTERM while the worker starts up ------------------------------------------------------------------------


def test_sigterm_during_start_up_ends_the_run_stopped(
    tmp_path: Path, tiny_llama: Path, subprocess_env
) -> None:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    cfg = make_config(tiny_llama, data, tmp_path, max_steps=50, batch_size=2)
    run, _ = prepare_run(ResolvedConfig(cfg, {}, "llm"), resume=None, overwrite=False)
    supervisor = start_worker(run)
    try:
        deadline = time.time() + TIMEOUT_S
        while True:  # the worker has written status.json: it is importing torch / loading the model now
            status = RunStatus.read(run.status_path)
            if status and status.pid and status.pid != supervisor.pid and status.state == "running":
                break
            assert supervisor.poll() is None and time.time() < deadline
            time.sleep(0.01)
        assert not any(e["type"] == "step" for e in read_events(run.events_path))
        os.kill(status.pid, signal.SIGTERM)
        code = supervisor.wait(timeout=TIMEOUT_S)
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(supervisor.pid, signal.SIGKILL)
        supervisor.wait(timeout=30)
    log = (run.path / "worker.log").read_text(errors="replace")[-3000:]
    assert code == EXIT_STOPPED, log
    assert RunStatus.read(run.status_path).state == "stopped"
    assert read_events(run.events_path)[-1]["type"] == "run_stopped"
    assert run.latest_checkpoint() is not None  # resumable, as docs/oom.md says


# --- an adapter made for another base model ---------------------------------------------------------------


def _llama_adapter(tiny_llama: Path, dest: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(tiny_llama), local_files_only=True, trust_remote_code=False
    )
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).save_pretrained(str(dest))
    assert json.loads((dest / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_llama
    )
    return dest


def _sample(base: Path, adapter: Path):
    args = ["sample", "--base", str(base), "--lora", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result, " ".join(result.output.split())


def test_sample_refuses_a_llama_adapter_on_a_qwen2_base(tmp_path: Path, tiny_llama: Path) -> None:
    adapter = _llama_adapter(tiny_llama, tmp_path / "llama-adapter")
    qwen = tmp_path / "qwen2"
    shutil.copytree(tiny_llama, qwen)
    config = json.loads((qwen / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])  # same shapes, another architecture
    (qwen / "config.json").write_text(json.dumps(config))
    result, out = _sample(qwen, adapter)
    assert result.exit_code == 1, out
    assert f"was trained on a llama model ({tiny_llama}); the base {qwen} is qwen2" in out


def test_sample_refuses_an_adapter_whose_shapes_do_not_fit(tmp_path: Path, tiny_llama: Path) -> None:
    adapter = _llama_adapter(tiny_llama, tmp_path / "llama-adapter")
    wider = tmp_path / "wider"
    shutil.copytree(tiny_llama, wider)
    (wider / "model.safetensors").unlink()
    config = json.loads((wider / "config.json").read_text())
    config.update(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    (wider / "config.json").write_text(json.dumps(config))
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(wider))).save_pretrained(str(wider))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "org/unknown-model"  # not on this machine: only the shapes can tell
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result, out = _sample(wider, adapter)
    assert result.exit_code == 1, out
    assert "does not fit the base" in out and "has input size 96 in the base, 64 in the adapter" in out


def test_sample_notes_an_adapter_trained_on_a_copy_of_the_base(tmp_path: Path, tiny_llama: Path) -> None:
    adapter = _llama_adapter(tiny_llama, tmp_path / "llama-adapter")
    copy = tmp_path / "llama-copy"
    shutil.copytree(tiny_llama, copy)
    result, out = _sample(copy, adapter)
    assert result.exit_code == 0, out
    assert f"warning: llama-adapter was trained on {tiny_llama}, not {copy} (both llama" in out
