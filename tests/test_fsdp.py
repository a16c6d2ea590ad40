"""FSDP (`fsdp: true`, `loratui train --gpus N --fsdp`): the base, the LoRA and the optimizer state sharded.

Two CPU processes (gloo, through accelerate's launcher under the supervisor) with FSDP train the same LoRA as
one plain process with the same global batch; the checkpoint and the adapter are the one-process files; the
FSDP checkpoint resumes (sharded or not); the OOM ladder restarts the group with its next rung.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llm_helpers import make_config, make_job, records, write_jsonl
from safetensors.torch import load_file

from loratui.config import ResolvedConfig, TrainConfig
from loratui.runs.events import read_events

TIMEOUT_S = 240


@pytest.fixture()
def subprocess_env(subprocess_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUI_COLLECTIVE_TIMEOUT_S", "60")


def _config(tiny_llama: Path, tmp_path: Path, name: str, rows: int = 8, **overrides) -> TrainConfig:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", rows))
    values = {"max_steps": 4, "save_steps": 2, "lora_dropout": 0.0, "seed": 3, "learning_rate": 1e-2}
    values.update(overrides)
    return make_config(tiny_llama, data, tmp_path / name, **values)


def _lora(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "lora.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _optimizer(checkpoint: Path) -> dict:
    return torch.load(checkpoint / "training_state.pt", weights_only=False)["optimizer"]


def _log(run) -> str:
    path = run.path / "worker.log"
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


def _run_processes(cfg: TrainConfig, processes: int):
    """Train `cfg` under the supervisor with `processes` CPU processes; returns the run directory."""
    import subprocess

    from loratui.train.process.launch import prepare_run, start_worker
    from loratui.train.process.launcher import Processes

    resolved = ResolvedConfig(cfg, {}, "llm")
    run, _ = prepare_run(resolved, resume=None, overwrite=False, processes=Processes(processes, cpu=True))
    supervisor = start_worker(run)
    try:
        code = supervisor.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        supervisor.kill()
        pytest.fail(f"the FSDP run did not end in {TIMEOUT_S}s; log:\n{_log(run)}")
    assert code == 0, _log(run)
    return run


def test_fsdp_two_processes_match_one_process(tmp_path, tiny_llama, subprocess_env) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loratui.train.llm.trainer import run_training

    # 7 rows, 4 per step: steps 2 and 4 hold 3 samples, so rank 0 runs two micro-batches of 1 and rank 1
    # one (plus a zero-weighted one: every forward is a collective under FSDP)
    fsdp = _config(
        tiny_llama, tmp_path, "fsdp", rows=7, batch_size=1, gradient_accumulation_steps=2, fsdp=True
    )
    run = _run_processes(fsdp, 2)
    events = read_events(run.events_path)
    started = next(e for e in events if e["type"] == "run_started")
    assert (started["processes"], started["batch_size_per_device"], started["global_batch"]) == (2, 1, 4)
    steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["step-2", "step-4"]
    assert started["fsdp"] is True and started["trainable_params"] > 0

    plain = _config(tiny_llama, tmp_path, "plain", rows=7, batch_size=4)
    job = make_job(plain)
    assert run_training(job, console=False).state == "finished"
    reference = job.run.checkpoints_dir / "step-4"
    sharded = run.checkpoints_dir / "step-4"
    assert _max_diff(_lora(sharded), _lora(reference)) <= 1e-5
    for a, b in zip(steps, [e for e in read_events(job.run.events_path) if e["type"] == "step"], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)

    # the checkpoint is a one-process checkpoint: same files, same optimizer state layout, same values
    assert sorted(p.name for p in sharded.iterdir()) == sorted(p.name for p in reference.iterdir())
    ours, theirs = _optimizer(sharded), _optimizer(reference)
    assert ours["param_groups"] == theirs["param_groups"]
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert ours["state"][index][key].shape == value.shape
            assert torch.allclose(ours["state"][index][key], value, atol=1e-6, rtol=1e-4), (index, key)

    # the exported adapter (gathered on rank 0) loads with PEFT and holds the trained LoRA
    adapter = Path(fsdp.output_dir)
    assert json.loads((adapter / "loratui_adapter.json").read_text())["training"]["processes"] == 2
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    model = PeftModel.from_pretrained(base, str(adapter))
    exported = load_file(adapter / "adapter_model.safetensors")
    assert _max_diff(exported, _lora(sharded)) == 0.0
    loaded = dict(model.named_parameters())
    some = next(k for k in exported if "lora_B" in k)
    assert torch.equal(loaded[some.replace(".weight", ".default.weight")], exported[some])

    # the FSDP checkpoint of step 2 resumes: sharded (FSDP, one process) and plain, both end where it ended
    final = _lora(sharded)
    for name, sharded_resume in (("resume-fsdp", True), ("resume-plain", False)):
        cfg = _config(tiny_llama, tmp_path, name, rows=7, batch_size=2, fsdp=sharded_resume)
        resumed = make_job(cfg, resume_from=run.checkpoints_dir / "step-2")
        assert run_training(resumed, console=False).state == "finished"
        assert _max_diff(_lora(resumed.run.checkpoints_dir / "step-4"), final) <= 1e-5, name


# --- the planner: per GPU ------------------------------------------------------------------------------------


def _planner_config(tiny_llama: Path, **overrides) -> TrainConfig:
    values = {
        "task_type": "text-generation",
        "model_family": "llm",
        "base_model": str(tiny_llama),
        "lora_rank": 8,
        "batch_size": 2,
        "max_seq_len": 128,
        "mixed_precision": "no",
    }
    return TrainConfig(**{**values, **overrides})


def _tiny_groups(tiny_llama: Path) -> tuple[int, int]:
    """(parameters of one decoder layer's linear weights, of the embeddings), from the config itself."""
    config = json.loads((tiny_llama / "config.json").read_text())
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head
    layer = hidden * config["num_attention_heads"] * head * 2 + 2 * hidden * kv + 3 * hidden * inter
    return layer, vocab * hidden


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_planner_per_gpu_with_fsdp_is_one_gpu_split_by_its_terms(tiny_llama, device) -> None:
    from loratui.memory.estimate import estimate_peak

    one = estimate_peak(_planner_config(tiny_llama), device=device).breakdown
    layer, embeddings = _tiny_groups(tiny_llama)
    for n in (2, 4):
        shard = estimate_peak(_planner_config(tiny_llama, fsdp=True), device=device, processes=n)
        parts = shard.breakdown
        for key in ("weights", "lora_params", "optimizer_state", "gradients"):
            assert parts[key] == -(-one[key] // n), (n, key)  # frozen weights, LoRA, its state: / N
        for key in set(one) - {"weights", "lora_params", "optimizer_state", "gradients"}:
            assert parts[key] == one[key], (n, key)  # activations, logits, CUDA overheads: per rank as before
        assert parts["fsdp_gathered"] == 2 * max(layer, embeddings) * 4  # two groups at full size, fp32
        assert shard.total_bytes == sum(parts.values())
        assert any(f"FSDP over {n}" in note for note in shard.notes)
    two = estimate_peak(_planner_config(tiny_llama, fsdp=True), device=device, processes=2).breakdown
    assert two["weights"] < one["weights"] and two["optimizer_state"] < one["optimizer_state"]


def test_planner_fsdp_qlora_keeps_unquantised_weights_in_bf16(tiny_llama) -> None:
    from loratui.memory.estimate import estimate_peak, planner_for
    from loratui.memory.estimate_types import NF4_BYTES

    cfg = _planner_config(tiny_llama, load_in_4bit=True, mixed_precision="bf16", fsdp=True)
    model = planner_for(cfg).summary.components["model"]
    whole = model.quantizable * NF4_BYTES + (model.params - model.quantizable) * 2 + model.buffers * 4
    parts = estimate_peak(cfg, device="cuda", processes=2).breakdown
    assert parts["weights"] == -(-int(whole) // 2)
    layer, embeddings = _tiny_groups(tiny_llama)
    assert parts["fsdp_gathered"] == 2 * int(max(layer * NF4_BYTES, embeddings * 2))


def test_dry_run_and_recommend_show_per_gpu_figures_with_fsdp(tmp_path, tiny_llama) -> None:
    import yaml
    from typer.testing import CliRunner

    from loratui.cli.app import app

    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 4))
    config = tmp_path / "x.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task_type": "text-generation",
                "base_model": str(tiny_llama),
                "train_data_dir": str(data),
                "output_dir": str(tmp_path / "out"),
                "max_seq_len": 64,
            }
        )
    )
    runner = CliRunner()
    args = ["train", "--config", str(config), "--gpus", "2", "--fsdp", "--dry-run", "--vram", "24GB"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["config"]["fsdp"] is True and payload["processes"]["processes"] == 2
    memory = payload["memory"]
    assert memory["fsdp"] is True and memory["processes"] == 2 and memory["breakdown"]["fsdp_gathered"] > 0
    text = runner.invoke(app, args)
    assert "per GPU, FSDP over 2" in text.output and "1/2 of the model" in text.output, text.output
    refused = runner.invoke(app, [*args, "--set", "optimizer=adamw8bit"])  # said before anything starts
    assert refused.exit_code != 0 and "use optimizer: adamw" in refused.output, refused.output

    result = runner.invoke(
        app, ["recommend", "--config", str(config), "--vram", "24GB", "--gpus", "2", "--fsdp", "--json"]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["per_gpu"] is True and payload["fsdp"] is True and payload["processes"] == 2
    assert payload["current"]["breakdown"]["fsdp_gathered"] > 0
    assert all(o["changes"].get("optimizer") != "adamw8bit" for o in payload["options"])


# --- refusals, settings --------------------------------------------------------------------------------------


def test_deepspeed_and_unsupported_fsdp_settings_are_refused_with_what_to_do(tmp_path) -> None:
    from loratui.config import ConfigError, load_config
    from loratui.train.process.fsdp import FsdpUnavailable, check_fsdp_settings, check_precision
    from loratui.train.process.launcher import LaunchError, processes_from_options

    deepspeed = tmp_path / "ds.yaml"
    deepspeed.write_text("distributed_type: DEEPSPEED\nnum_processes: 2\n")
    with pytest.raises(LaunchError, match="does not train with DeepSpeed.*--fsdp"):
        processes_from_options(None, None, deepspeed)
    config = tmp_path / "x.yaml"
    config.write_text("task_type: text-generation\nbase_model: m\ndeepspeed: ds_z3.json\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert "x.yaml:3" in error.value.render() and "fsdp: true" in error.value.render()

    assert TrainConfig(fsdp="full_shard auto_wrap").fsdp is True  # transformers' TrainingArguments spelling
    assert TrainConfig(fsdp=["full_shard"]).fsdp is True  # axolotl's
    assert TrainConfig(fsdp="").fsdp is False
    config.write_text("task_type: text-generation\nbase_model: m\nuse_fsdp: true\n")
    assert load_config(config).config.fsdp is True
    with pytest.raises(ValueError, match="offload is not supported"):
        TrainConfig(fsdp="full_shard offload")
    with pytest.raises(FsdpUnavailable, match="optimizer: adamw"):
        check_fsdp_settings(TrainConfig(fsdp=True, optimizer="adamw8bit"))
    # the chunked loss (the default) is accepted: under FSDP the trainer computes the full logits, and the
    # planner predicts that step
    check_fsdp_settings(TrainConfig(fsdp=True, chunked_loss=True))
    from loratui.memory.estimate import regime_for

    llm = {"task_type": "text-generation", "chunked_loss": True}
    assert regime_for(TrainConfig(fsdp=True, **llm), "cuda", "llm")[0].chunked_loss is False
    assert regime_for(TrainConfig(**llm), "cuda", "llm")[0].chunked_loss is True
    with pytest.raises(FsdpUnavailable, match="method dpo is not supported with FSDP"):
        check_fsdp_settings(TrainConfig(fsdp=True, method="dpo"))
    with pytest.raises(FsdpUnavailable, match="mixed_precision: bf16"):
        check_precision("fp16")
    check_precision("bf16")


# --- in one process: the OOM ladder, 4-bit shards -------------------------------------------------------------


def test_out_of_memory_with_fsdp_restarts_the_group_with_the_next_rung(tmp_path, tiny_llama) -> None:
    """Under FSDP the other ranks wait inside the step's all-gather: no in-process retry. The worker asks for
    a restart with the ladder's next rung recorded (micro-batch halved, effective batch kept); the rungs
    FSDP cannot use (8-bit optimizer, chunked loss) are skipped."""
    from loratui.train.llm.trainer import run_training
    from loratui.train.oom.errors import RestartNeeded
    from loratui.train.oom.record import read_record

    cfg = _config(tiny_llama, tmp_path, "oom", batch_size=2, fsdp=True, simulate_vram="1MiB")
    job = make_job(cfg)
    with pytest.raises(RestartNeeded, match="fsdp"):
        run_training(job, console=False)
    record = read_record(job.run.path)
    assert (record["current"]["batch_size"], record["current"]["gradient_accumulation_steps"]) == (1, 2)
    oom = [e for e in read_events(job.run.events_path) if e["type"] == "oom"]
    assert oom[-1]["rung"] == "micro_batch" and "fsdp" in oom[-1]["restart"]

    # at a micro-batch of 1 the next rungs are checkpointing, then (no chunked-loss, activation-offload or 8-bit
    # rung under FSDP) the length
    small = cfg.model_copy(
        update={"batch_size": 1, "gradient_accumulation_steps": 2, "gradient_checkpointing": True}
    )
    job = make_job(small)
    with pytest.raises(RestartNeeded):
        run_training(job, console=False)
    oom = [e for e in read_events(job.run.events_path) if e["type"] == "oom"]
    assert oom[-1]["rung"] == "quality"
    assert oom[-1]["new"]["optimizer"] == "adamw" and oom[-1]["new"]["max_seq_len"] < cfg.max_seq_len


def test_a_4bit_base_with_bf16_storage_shards_and_trains_like_the_unsharded_one(tiny_llama) -> None:
    """The QLoRA path of FSDP: NF4 weights packed in bf16 (`bnb_4bit_quant_storage`) become FSDP shards;
    forward and LoRA gradients equal the unsharded 4-bit model's (bitsandbytes runs NF4 on the CPU)."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from loratui.train.process.fsdp import close_own_group, is_sharded, shard_model

    def load():
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=torch.bfloat16,
        )
        model = AutoModelForCausalLM.from_pretrained(
            str(tiny_llama), quantization_config=quant, device_map={"": "cpu"}, dtype=torch.bfloat16
        )
        torch.manual_seed(0)
        lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
        return get_peft_model(model, lora)

    ids = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    reference = load()
    assert any(type(p).__name__ == "Params4bit" and p.dtype == torch.bfloat16 for p in reference.parameters())
    loss = reference(input_ids=ids, labels=ids).loss
    loss.backward()
    wanted = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    try:
        sharded = shard_model(load(), torch.device("cpu"))
        assert is_sharded(sharded)
        again = sharded(input_ids=ids, labels=ids).loss
        again.backward()
        assert float(again.detach()) == pytest.approx(float(loss.detach()), rel=1e-6)
        grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.requires_grad}
        assert grads.keys() == wanted.keys()
        assert max(float((grads[n] - wanted[n]).abs().max()) for n in wanted) <= 1e-6
    finally:
        close_own_group()


@pytest.mark.slow  # about 2 minutes on 2 CPU cores (two launches); the fast check is the in-process one above
def test_out_of_memory_in_a_two_process_fsdp_run_restarts_and_resumes_the_shards(
    tmp_path, tiny_llama, subprocess_env
) -> None:
    """Step 3's rows are long: at batch 2 a rank runs out of memory on a simulated card, asks for a restart
    with the micro-batch rung; the supervisor restarts both processes from step 2's checkpoint (gathered,
    loaded back into the shards) and the run finishes with the LoRA of one plain process x batch 4."""
    from loratui.train.llm.trainer import run_training
    from loratui.train.loop.plan import StepPlan

    seed, long_text, short_text = 3, "the patient has a fever and a cough " * 5, "rest"
    long_rows = set(StepPlan(16, 4, 1, 3, seed).samples_for_step(2))
    rows = [{"text": f"{long_text if i in long_rows else short_text} {i}"} for i in range(16)]
    data = write_jsonl(tmp_path / "data" / "text.jsonl", rows)
    only_long = write_jsonl(tmp_path / "long" / "text.jsonl", [{"text": long_text}] * 4)
    common = {"max_steps": 3, "save_steps": 1, "lora_dropout": 0.0, "seed": seed, "max_seq_len": 96}

    def peak(batch: int, accumulation: int) -> int:  # a rank's long step, metered in one FSDP process
        cfg = make_config(
            tiny_llama,
            only_long,
            tmp_path / f"probe{batch}",
            batch_size=batch,
            gradient_accumulation_steps=accumulation,
            simulate_vram="1TiB",
            fsdp=True,
            **{**common, "max_steps": 1},
        )
        job = make_job(cfg)
        run_training(job, console=False)
        return next(e["meter_peak"] for e in read_events(job.run.events_path) if e["type"] == "step")

    whole, split = peak(2, 1), peak(1, 2)
    assert split < whole
    cfg = make_config(
        tiny_llama,
        data,
        tmp_path / "two",
        batch_size=2,
        fsdp=True,
        simulate_vram=str((split + whole) // 2),
        **common,
    )
    run = _run_processes(cfg, 2)
    events = read_events(run.events_path)
    restarts = [e for e in events if e["type"] == "warning" and e.get("restart")]
    assert len(restarts) == 1 and restarts[0]["resume_from"].endswith("step-2"), [e["type"] for e in events]
    assert [e["step"] for e in events if e["type"] == "step"] == [1, 2, 3]
    assert [e["type"] for e in events].count("run_finished") == 1
    started = [e for e in events if e["type"] == "run_started"]
    assert [(e["batch_size_per_device"], e["micro_batches_per_step"]) for e in started] == [(2, 1), (1, 2)]

    # FSDP computes the loss from the full logits: the reference does too (the chunked loss sums in another order)
    reference = make_job(
        make_config(tiny_llama, data, tmp_path / "one", batch_size=4, chunked_loss=False, **common)
    )
    assert run_training(reference, console=False).state == "finished"
    # 5e-5: with LoRA on every linear layer (the default) the sharded sums, the restart and the 1 x 2 split leave
    # float differences of about 2e-5 after three AdamW steps; a lost or mis-restored tensor would differ by an
    # update (learning rate 1e-2)
    assert (
        _max_diff(_lora(run.checkpoints_dir / "step-3"), _lora(reference.run.checkpoints_dir / "step-3"))
        <= 5e-5
    )


@pytest.mark.parametrize(
    "settings",
    [
        {
            "mixed_precision": "bf16"
        },  # the sharded model gets accelerate's autocast forward, as a prepared one
        {
            "gradient_checkpointing": True,
            "val_split": 0.25,
            "sample_prompts": ["hi"],
            "sample_every_steps": 1,
        },
    ],
    ids=["bf16", "checkpointing-eval-samples"],
)
def test_one_fsdp_process_trains_as_one_plain_process(tmp_path, tiny_llama, settings) -> None:
    from loratui.train.llm.trainer import run_training

    loras, events = [], []
    for sharded in (True, False):
        cfg = _config(
            tiny_llama,
            tmp_path,
            f"fsdp-{sharded}",
            max_steps=3,
            save_steps=3,
            batch_size=2,
            fsdp=sharded,
            **settings,
        )
        job = make_job(cfg)
        assert run_training(job, console=False).state == "finished"
        loras.append(_lora(job.run.checkpoints_dir / "step-3"))
        events.append(read_events(job.run.events_path))
    assert _max_diff(*loras) <= 1e-6
    if "val_split" in settings:
        fsdp_kinds, plain_kinds = ([e["type"] for e in run] for run in events)
        assert fsdp_kinds.count("eval") == plain_kinds.count("eval") > 0  # evaluation runs on every rank
        assert "sample" not in fsdp_kinds and "sample" in plain_kinds
        assert any("not answered during training with fsdp" in e.get("message", "") for e in events[0])
