"""Every optimizer trains, checkpoints and resumes exactly: a run stopped and resumed from its checkpoint ends
with the same LoRA (1e-6) as an uninterrupted run, on the tiny SD1.5 pipeline and the tiny Llama. Schedule-free
AdamW checkpoints and exports its averaged weights (`eval_mode`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from llm_helpers import StopAfter, adapter_tensors, make_config, max_diff, records, write_jsonl
from llm_helpers import make_job as llm_job
from safetensors.torch import load_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config

from loratui.train.llm.trainer import run_training
from loratui.train.sd.trainer import train

#: each optimizer as a user writes it, with a learning rate it is used with
OPTIMIZERS = {
    "adamw": {"optimizer": "adamw"},
    "adamw8bit": {"optimizer_type": "AdamW8bit"},
    "prodigy": {
        "optimizer_type": "Prodigy",
        "learning_rate": 1.0,
        "optimizer_args": ["d_coef=2", "decouple=True"],
    },
    "adafactor": {"optimizer_type": "AdaFactor"},
    "adafactor_relative": {
        "optimizer_type": "AdaFactor",
        "optimizer_args": ["relative_step=True", "scale_parameter=True", "warmup_init=True"],
    },
    "schedulefree_adamw": {"optimizer_type": "AdamWScheduleFree", "lr_warmup_steps": 1},
    "came": {"optimizer_type": "CAME", "optimizer_args": ["weight_decay=0.01"]},
    "lion": {"optimizer_type": "Lion", "learning_rate": "1e-4"},
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture()
def qa_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))


def _sd_config(tmp: Path, base: Path, data: Path, name: str) -> Path:
    values = {"epochs": 1, "batch_size": 2, "save_steps": 1, "lora_rank": 4, "alpha": 4}
    return seed_like_config(tmp, base, data, **values, **OPTIMIZERS[name])


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sd_optimizer_resumes_exactly(name, tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    job = make_job(_sd_config(tmp_path / "a", tiny_sd15, data, name))
    assert train(job) == "finished"
    resumed_job = make_job(
        _sd_config(tmp_path / "b", tiny_sd15, data, name), resume_from=job.run.path / "checkpoints" / "step-1"
    )
    assert train(resumed_job) == "finished"
    assert [e["step"] for e in events_of(resumed_job.run, "step")] == [2]  # only the second step ran
    first = load_file(str(job.run.path / "checkpoints" / "step-1" / "lora.safetensors"))
    straight = load_file(str(job.run.latest_checkpoint() / "lora.safetensors"))
    resumed = load_file(str(resumed_job.run.latest_checkpoint() / "lora.safetensors"))
    assert set(straight) == set(resumed)
    assert max((straight[k] - first[k]).abs().max().item() for k in straight) > 1e-6  # step 2 changed it
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6


def _llm_values(name: str) -> dict:
    from loratui.config.aliases import normalise_value

    values = dict(OPTIMIZERS[name])
    values["optimizer"] = normalise_value("optimizer", values.pop("optimizer_type", values.get("optimizer")))
    values["learning_rate"] = float(values.get("learning_rate", 1e-2))
    return {"lr_scheduler": "cosine", "max_steps": 4, "save_steps": 2, **values}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_llm_optimizer_resumes_exactly(name, tiny_llama, qa_file, tmp_path):
    straight = run_training(
        llm_job(make_config(tiny_llama, qa_file, tmp_path / "a", **_llm_values(name))), console=False
    )
    assert straight.state == "finished"
    cfg = make_config(tiny_llama, qa_file, tmp_path / "b", **_llm_values(name))
    job = llm_job(cfg)
    assert run_training(job, stop=StopAfter(2), console=False).state == "stopped"
    checkpoint = job.run.latest_checkpoint()
    assert checkpoint.name == "step-2"
    result = run_training(llm_job(cfg, resume_from=checkpoint, run=job.run), console=False)
    assert result.state == "finished" and result.step == 4
    assert max_diff(adapter_tensors(straight.adapter_dir), adapter_tensors(result.adapter_dir)) <= 1e-6


def test_resuming_with_another_optimizer_is_refused(tiny_llama, qa_file, tmp_path):
    """One optimizer's state never loads into another: the message names the optimizer to set."""
    cfg = make_config(tiny_llama, qa_file, tmp_path, **_llm_values("prodigy"))
    job = llm_job(cfg)
    assert run_training(job, stop=StopAfter(2), console=False).state == "stopped"
    other = cfg.model_copy(update={"optimizer": "adamw", "optimizer_args": {}})
    with pytest.raises(
        ValueError, match="trained with optimizer prodigy, this run uses adamw; set optimizer: prodigy"
    ):
        run_training(llm_job(other, resume_from=job.run.latest_checkpoint(), run=job.run), console=False)


def test_sd_resume_with_another_optimizer_is_refused(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    job = make_job(_sd_config(tmp_path / "a", tiny_sd15, data, "lion"))
    assert train(job) == "finished"
    config = _sd_config(tmp_path / "b", tiny_sd15, data, "came")
    with pytest.raises(ValueError, match="trained with optimizer lion, this run uses came"):
        train(make_job(config, resume_from=job.run.path / "checkpoints" / "step-1"))
