"""Preference training (DPO, IPO, ORPO): the losses against hand-computed values, the pair formats, the
training runs on the tiny Llama (margins rise, exact resume, OOM splits whole pairs), and the planner."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from llm_helpers import (
    QA,
    StopAfter,
    adapter_tensors,
    make_config,
    make_job,
    max_diff,
    single_thread,
    write_jsonl,
)

from loratui.models.llm.preference import dpo_losses, log1mexp, orpo_losses
from loratui.runs.events import read_events
from loratui.train.llm.preference_step import PreferenceStep, Reference
from loratui.train.llm.trainer import run_training

REJECTED = [
    "不知道。",
    "No idea, ask someone else.",
    "随便吧。",
    "Yes, as much as you like.",
    "不用管。",
    "Ten litres.",
    "多喝酒。",
    "Nothing much.",
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.fixture(autouse=True)
def _env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("LORATUI_DEBUG_SAMPLES", "1")
    monkeypatch.delenv("LORATUI_SIMULATE_VRAM", raising=False)


class _Cpu:
    """The two things `PreferenceStep` reads from an accelerator."""

    device = torch.device("cpu")
    autocast = None


def pairs(n: int = 4) -> list[dict[str, Any]]:
    return [{"prompt": QA[i][0], "chosen": QA[i][1], "rejected": REJECTED[i]} for i in range(n)]


def _steps(job) -> list[dict[str, Any]]:
    return [e for e in read_events(job.run.events_path) if e["type"] == "step"]


# --- the losses ------------------------------------------------------------------------------------------


def test_dpo_sigmoid_loss_and_rewards_match_hand_computed_values() -> None:
    # policy chosen/rejected -10, -12; reference -11, -11: h = (1) - (-1) = 2
    out = dpo_losses(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.5
    )
    assert float(out.loss) == pytest.approx(-math.log(1 / (1 + math.exp(-1.0))), rel=1e-6)  # log(1 + e^-1)
    assert float(out.chosen_rewards) == pytest.approx(0.5) and float(out.rejected_rewards) == pytest.approx(
        -0.5
    )


def test_conservative_dpo_mixes_the_flipped_label() -> None:
    out = dpo_losses(
        torch.tensor([-10.0]),
        torch.tensor([-12.0]),
        torch.tensor([-11.0]),
        torch.tensor([-11.0]),
        beta=0.5,
        label_smoothing=0.2,
    )
    expected = 0.8 * math.log(1 + math.exp(-1.0)) + 0.2 * math.log(1 + math.exp(1.0))
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)


def test_ipo_loss_uses_length_normalised_log_ratios() -> None:
    # chosen ratio (-10 + 11) / 4 tokens = 0.25, rejected (-12 + 11) / 2 tokens = -0.5: h = 0.75;
    # beta 0.5: target 1 / (2 * 0.5) = 1; loss (0.75 - 1)^2
    out = dpo_losses(
        torch.tensor([-10.0]),
        torch.tensor([-12.0]),
        torch.tensor([-11.0]),
        torch.tensor([-11.0]),
        beta=0.5,
        loss_type="ipo",
        chosen_tokens=torch.tensor([4.0]),
        rejected_tokens=torch.tensor([2.0]),
    )
    assert float(out.loss) == pytest.approx(0.0625, rel=1e-6)


def test_orpo_loss_is_nll_plus_lambda_times_the_odds_ratio_term() -> None:
    chosen, rejected = math.log(0.5), math.log(0.2)  # mean token probabilities 0.5 and 0.2
    odds = (0.5 / 0.5) / (0.2 / 0.8)  # = 4
    expected = -chosen + 0.1 * math.log(1 + 1 / odds)  # -log sigmoid(log 4) = log(1 + 1/4)
    out = orpo_losses(torch.tensor([chosen]), torch.tensor([rejected]), lam=0.1)
    assert float(out.loss) == pytest.approx(expected, rel=1e-6)
    assert float(out.extra["log_odds_ratio"]) == pytest.approx(math.log(4), rel=1e-6)
    # log(1 - e^x) is finite and accurate at both ends
    assert float(log1mexp(torch.tensor(-1e-20))) == pytest.approx(math.log(1e-20), rel=1e-6)
    assert float(log1mexp(torch.tensor(-50.0))) == pytest.approx(-math.exp(-50.0), rel=1e-6)


# --- training on the tiny Llama ----------------------------------------------------------------------------


def _pref_config(tiny_llama: Path, data: Path, out: Path, **overrides: Any):
    values: dict[str, Any] = {
        "method": "dpo",
        "batch_size": 2,
        "max_steps": 30,
        "learning_rate": 5e-3,
        "lora_rank": 4,
        "save_steps": 10,
    }
    values.update(overrides)
    return make_config(tiny_llama, data, out, **values)


def test_dpo_raises_the_reward_margin_on_the_training_pairs(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    job = make_job(_pref_config(tiny_llama, data, tmp_path / "dpo"))
    result = run_training(job, console=False)
    assert result.state == "finished" and result.step == 30
    steps = _steps(job)
    first, last = steps[0], steps[-1]
    assert first["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # a new LoRA starts at the reference
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert last["reward_margin"] > 0.5 and last["reward_accuracy"] == 1.0
    assert sum(e["reward_margin"] for e in steps[-5:]) > sum(e["reward_margin"] for e in steps[:5])
    assert last["loss"] < 0.7 * first["loss"]
    # every training pair, scored by the trained model against the reference (the adapter switched off)
    step = PreferenceStep(
        job.resolved.config, result.model, result.data, 0, _Cpu(), Reference(result.model, None)
    )
    with torch.no_grad():
        losses = step.pair_losses(list(range(len(result.data.train))))
    margins = (losses.chosen_rewards - losses.rejected_rewards).tolist()
    assert len(margins) == 4 and min(margins) > 0.2
    marker = json.loads((result.adapter_dir / "loratui_adapter.json").read_text())
    assert marker["training"]["method"] == "dpo" and marker["training"]["pref_beta"] == 0.1


def test_orpo_raises_the_log_odds_ratio_and_the_margin(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    job = make_job(
        _pref_config(tiny_llama, data, tmp_path / "orpo", method="orpo", orpo_lambda=1.0, learning_rate=2e-2)
    )
    result = run_training(job, console=False)
    assert result.state == "finished" and result.step == 30
    steps = _steps(job)
    early, late = steps[:5], steps[-5:]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(e[key] for e in rows) / len(rows)

    assert mean(late, "log_odds_ratio") > mean(early, "log_odds_ratio") + 0.2
    assert mean(late, "reward_margin") > mean(early, "reward_margin")
    assert mean(late, "nll_chosen") < mean(early, "nll_chosen")
    assert steps[-1]["reward_accuracy"] == 1.0
    assert all("reward_chosen" in e and "reward_rejected" in e for e in steps)


def test_an_out_of_memory_split_keeps_both_sides_of_every_pair_together(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loratui.train.llm.preference_step as step_module

    monkeypatch.setenv("LORATUI_OOM_PLANNER", "0")  # one rung at a time: micro_batch first
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    seen: list[tuple[list[int], list[Any]]] = []
    real_pair_losses, real_logps = step_module.PreferenceStep.pair_losses, step_module.sequence_logps
    collated: list[list[Any]] = []
    real_collate = step_module.collate

    def recording_collate(rows, pad_id):
        collated.append(list(rows))
        return real_collate(rows, pad_id)

    def recording_pair_losses(self, indices):
        out = real_pair_losses(self, indices)
        seen.append((list(indices), collated[-1]))
        return out

    def small_card(model, batch, **kwargs):
        if torch.is_grad_enabled() and batch.input_ids.shape[0] > 4:  # more than two pairs: out of memory
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_logps(model, batch, **kwargs)

    monkeypatch.setattr(step_module, "collate", recording_collate)
    monkeypatch.setattr(step_module.PreferenceStep, "pair_losses", recording_pair_losses)
    monkeypatch.setattr(step_module, "sequence_logps", small_card)
    job = make_job(
        _pref_config(tiny_llama, data, tmp_path / "oom", batch_size=4, max_steps=2, save_steps=None)
    )
    result = run_training(job, console=False)
    monkeypatch.undo()

    assert result.state == "finished"
    events = read_events(job.run.events_path)
    recovered = [e for e in events if e["type"] == "oom_recovered"]
    assert [e["rung"] for e in recovered] == ["micro_batch"]
    assert (recovered[0]["new"]["batch_size"], recovered[0]["new"]["gradient_accumulation_steps"]) == (2, 2)
    train = result.data.train
    assert len(seen) == 4  # after the failed 4-pair forward: 2 steps x 2 micro-batches of 2 pairs
    for indices, rows in seen:
        assert len(indices) == 2
        # the forward's rows are exactly the chosen then the rejected side of the same pairs, in order
        assert rows == [train[i].chosen for i in indices] + [train[i].rejected for i in indices]
    steps = [e for e in events if e["type"] == "step"]
    for step in steps:
        assert sorted(step["sample_indices"]) == sorted({i for i in step["sample_indices"]})
    # the update equals a run configured with 2 x 2 from the start
    reference = make_job(
        _pref_config(
            tiny_llama,
            data,
            tmp_path / "ref",
            batch_size=2,
            gradient_accumulation_steps=2,
            max_steps=2,
            save_steps=None,
        )
    )
    expected = run_training(reference, console=False)
    assert max_diff(adapter_tensors(result.adapter_dir), adapter_tensors(expected.adapter_dir)) <= 1e-5


def _sft_adapter(tmp_path: Path, tiny_llama: Path) -> Path:
    from llm_helpers import records

    sft_data = write_jsonl(tmp_path / "data" / "sft.jsonl", records("prompt_response", 4))
    sft = run_training(
        make_job(make_config(tiny_llama, sft_data, tmp_path / "sft", max_steps=3)), console=False
    )
    return sft.adapter_dir


def test_dpo_from_an_sft_adapter_uses_it_as_the_reference_and_resumes_exactly(
    tmp_path: Path, tiny_llama: Path
) -> None:
    sft = _sft_adapter(tmp_path, tiny_llama)
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    options = {"init_lora": str(sft), "max_steps": 6, "save_steps": None, "lr_scheduler": "cosine"}
    straight_job = make_job(_pref_config(tiny_llama, data, tmp_path / "a", **options))
    straight = run_training(straight_job, console=False)
    steps = _steps(straight_job)
    # the SFT adapter is the reference: the first step starts at margin 0 and loss ln 2, then the margin grows
    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert steps[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert steps[-1]["reward_margin"] > 0

    cfg = _pref_config(tiny_llama, data, tmp_path / "b", **options)
    job = make_job(cfg)
    assert run_training(job, stop=StopAfter(2), console=False).state == "stopped"
    job2 = make_job(cfg, resume_from=job.run.latest_checkpoint(), run=job.run)
    assert run_training(job2, stop=StopAfter(2), console=False).state == "stopped"
    resumed = run_training(make_job(cfg, resume_from=job.run.latest_checkpoint(), run=job.run), console=False)
    assert resumed.state == "finished" and resumed.step == 6
    assert max_diff(adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)) <= 1e-6
    events = read_events(job.run.events_path)
    resumed_steps = [e for e in events if e["type"] == "step"]
    assert [e["step"] for e in resumed_steps] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(steps, resumed_steps, strict=True):
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], abs=1e-5)


def test_the_planner_predicts_two_sequences_per_sample_for_dpo_and_orpo() -> None:
    from loratui.config import TrainConfig
    from loratui.memory.estimate import estimate_peak

    base = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model="meta-llama/Llama-2-7b-hf",
        max_seq_len=1024,
        batch_size=2,
        mixed_precision="bf16",
    )
    sft = estimate_peak(base)
    sft_rows = estimate_peak(base.model_copy(update={"batch_size": 4}))  # the rows a pair step runs
    dpo = estimate_peak(base.model_copy(update={"method": "dpo"}))
    orpo = estimate_peak(base.model_copy(update={"method": "orpo"}))
    assert dpo.total_bytes > sft.total_bytes and orpo.total_bytes > sft.total_bytes
    acts = ("activations", "logits_loss")
    for pair in (dpo, orpo):
        assert [pair.breakdown[k] for k in acts] == [sft_rows.breakdown[k] for k in acts]
        assert pair.breakdown["activations"] > 1.8 * sft.breakdown["activations"]
    assert any("(4 rows per forward), plus a reference forward" in n for n in dpo.notes)
    assert any("4 rows per forward" in n for n in orpo.notes) and not any(
        "reference" in n for n in orpo.notes
    )
    # the reference pass runs without gradients: it never sets the peak of a step that also trains
    assert dpo.total_bytes == orpo.total_bytes and dpo.phase == "micro-batch forward/backward"


def test_chunked_sequence_logps_equal_the_full_ones_with_the_same_gradients(tiny_llama: Path) -> None:
    from loratui.models.llm.batches import Unit, collate
    from loratui.models.llm.loading import load_base
    from loratui.models.llm.preference import sequence_logps

    model, _, _ = load_base(str(tiny_llama))
    model.train()
    units = [Unit([1, 5, 9, 13, 17, 21], [-100, -100, 9, 13, 17, 21], 4), Unit([1, 7, 8], [-100, 7, 8], 2)]
    batch = collate(units, 0)
    full = sequence_logps(model, batch)
    full.logps.sum().backward()
    expected = model.lm_head.weight.grad.clone()
    model.zero_grad(set_to_none=True)
    chunked = sequence_logps(model, batch, chunked=True, chunk_tokens=2)
    chunked.logps.sum().backward()
    assert full.tokens.tolist() == [4.0, 2.0] == chunked.tokens.tolist()
    torch.testing.assert_close(chunked.logps.detach(), full.logps.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.lm_head.weight.grad, expected, rtol=1e-4, atol=1e-6)
    # the per-row sums are the token loss of each row, negated
    from loratui.models.llm.loss import token_loss_sum

    with torch.no_grad():
        rows = [float(token_loss_sum(model, collate([u], 0))) for u in units]
    assert [-v for v in full.logps.tolist()] == pytest.approx(rows, rel=1e-5)


def test_ipo_and_chunked_dpo_train_and_report_rewards(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    runs = {"ipo": {"pref_loss": "ipo"}, "chunked": {"chunked_loss": True, "label_smoothing": 0.1}}
    first = {}
    for name, extra in runs.items():
        job = make_job(_pref_config(tiny_llama, data, tmp_path / name, max_steps=4, save_steps=None, **extra))
        assert run_training(job, console=False).state == "finished"
        steps = _steps(job)
        assert len(steps) == 4 and all(math.isfinite(e["loss"]) and "reward_margin" in e for e in steps)
        first[name] = steps[0]["loss"]
    assert first["ipo"] == pytest.approx(25.0, rel=1e-4)  # (0 - 1 / (2 * 0.1))^2 with a new LoRA
    assert first["chunked"] == pytest.approx(math.log(2), rel=1e-4)  # label smoothing: still ln 2 at h = 0


def test_the_metered_pair_step_matches_the_planners_two_rows_per_pair(
    tmp_path: Path, tiny_llama: Path
) -> None:
    """The same 8 sequences, as 8 SFT samples or as 4 pairs: the metered step peaks agree, as the planner's
    prediction (2 rows per pair) says; 4 SFT samples need about half."""
    from loratui.memory.estimate import estimate_peak

    data = pairs(4)
    pair_file = write_jsonl(tmp_path / "data" / "pairs.jsonl", data)
    sft_file = write_jsonl(
        tmp_path / "data" / "sft.jsonl",
        [{"prompt": r["prompt"], "response": r[side]} for r in data for side in ("chosen", "rejected")],
    )
    peaks, predicted = {}, {}
    for name, path, extra in [
        ("sft8", sft_file, {"batch_size": 8}),
        ("sft4", sft_file, {"batch_size": 4}),
        ("dpo4", pair_file, {"batch_size": 4, "method": "dpo"}),
        ("orpo4", pair_file, {"batch_size": 4, "method": "orpo"}),
    ]:
        cfg = make_config(tiny_llama, path, tmp_path / name, max_steps=1, simulate_vram="1TiB", **extra)
        job = make_job(cfg)
        run_training(job, console=False)
        peaks[name] = _steps(job)[0]["meter_peak"]
        predicted[name] = estimate_peak(cfg, device="cpu").total_bytes
    assert peaks["dpo4"] == pytest.approx(peaks["sft8"], rel=0.02)
    assert peaks["orpo4"] == pytest.approx(peaks["sft8"], rel=0.02)
    assert peaks["dpo4"] > 1.5 * peaks["sft4"]
    assert predicted["dpo4"] == predicted["orpo4"] == predicted["sft8"] > predicted["sft4"]


def test_a_new_lora_dpo_run_with_dropout_resumes_exactly(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    options = {"max_steps": 4, "save_steps": None, "lora_dropout": 0.1, "gradient_accumulation_steps": 2}
    straight = run_training(
        make_job(_pref_config(tiny_llama, data, tmp_path / "a", **options)), console=False
    )
    cfg = _pref_config(tiny_llama, data, tmp_path / "b", **options)
    job = make_job(cfg)
    assert run_training(job, stop=StopAfter(2), console=False).state == "stopped"
    resumed = run_training(make_job(cfg, resume_from=job.run.latest_checkpoint(), run=job.run), console=False)
    assert resumed.state == "finished" and resumed.step == 4
    assert max_diff(adapter_tensors(straight.adapter_dir), adapter_tensors(resumed.adapter_dir)) <= 1e-6


# --- KTO ----------------------------------------------------------------------------------------------------


def test_kto_loss_matches_hand_computed_values() -> None:
    from loratui.models.llm.preference import kto_losses

    # ratios: +1 (desirable), -2 (undesirable); KL estimate 0.5; beta 0.5; weights 1 and 2
    out = kto_losses(
        torch.tensor([-9.0, -13.0]),
        torch.tensor([-10.0, -11.0]),
        torch.tensor([True, False]),
        torch.tensor(0.5),
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=2.0,
    )
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = [1 - sigmoid(0.5 * (1 - 0.5)), 2 * (1 - sigmoid(0.5 * (0.5 + 2)))]
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-6)
    assert float(out.chosen_rewards[0]) == pytest.approx(0.5) and math.isnan(float(out.chosen_rewards[1]))
    assert float(out.rejected_rewards[1]) == pytest.approx(-1.0) and math.isnan(
        float(out.rejected_rewards[0])
    )
    # a negative KL estimate counts as 0
    zero = kto_losses(
        torch.tensor([-9.0]), torch.tensor([-10.0]), torch.tensor([True]), torch.tensor(-3.0), beta=0.5
    )
    assert float(zero.loss) == pytest.approx(1 - sigmoid(0.5), rel=1e-6)


def test_kto_raises_chosen_rewards_and_lowers_rejected_ones(tmp_path: Path, tiny_llama: Path) -> None:
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))  # 4 pairs: 8 KTO examples
    job = make_job(_pref_config(tiny_llama, data, tmp_path / "kto", method="kto", batch_size=4))
    result = run_training(job, console=False)
    assert result.state == "finished" and result.step == 30
    steps = _steps(job)
    early, late = steps[:5], steps[-5:]

    def mean(rows: list[dict[str, Any]], key: str) -> float:
        return sum(e[key] for e in rows) / len(rows)

    assert steps[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6) and steps[0]["kl"] == 0.0
    assert mean(late, "reward_margin") > mean(early, "reward_margin") + 0.2
    assert mean(late, "reward_chosen") > 0 > mean(late, "reward_rejected")
    assert all("reward_accuracy" not in e for e in steps)  # examples, not pairs
    assert result.data.stats["desirable"] == 4 and result.data.stats["undesirable"] == 4


def test_a_kto_step_gives_the_same_update_in_micro_batches(tmp_path: Path, tiny_llama: Path) -> None:
    """The KL estimate is taken over the whole step, so splitting it (as the OOM ladder does) changes nothing."""
    data = write_jsonl(tmp_path / "data" / "pairs.jsonl", pairs(4))
    options = {"method": "kto", "max_steps": 3, "save_steps": None}
    whole = run_training(
        make_job(_pref_config(tiny_llama, data, tmp_path / "a", batch_size=4, **options)), console=False
    )
    split = run_training(
        make_job(
            _pref_config(
                tiny_llama, data, tmp_path / "b", batch_size=2, gradient_accumulation_steps=2, **options
            )
        ),
        console=False,
    )
    assert max_diff(adapter_tensors(whole.adapter_dir), adapter_tensors(split.adapter_dir)) <= 1e-5


def test_the_planner_predicts_kto_as_one_sequence_per_sample() -> None:
    from loratui.config import TrainConfig
    from loratui.memory.estimate import estimate_peak

    base = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model="meta-llama/Llama-2-7b-hf",
        max_seq_len=1024,
        batch_size=2,
        mixed_precision="bf16",
    )
    sft, kto = estimate_peak(base), estimate_peak(base.model_copy(update={"method": "kto"}))
    assert kto.breakdown["activations"] == sft.breakdown["activations"]
    assert any("KL estimate" in note for note in kto.notes)
