"""Model families: each tiny family fixture trains from YAML, resumes exactly, exports an adapter PEFT loads in
full, merges, and renders its own chat template; default targets per family, MoE experts, clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from llm_helpers import (
    StopAfter,
    adapter_tensors,
    max_diff,
    records,
    single_thread,
    write_jsonl,
    write_llm_yaml,
)

from loratui.config import TrainConfig, load_config
from loratui.models.llm.families import UnsupportedArchitecture, plan_targets
from loratui.runs.events import read_events
from loratui.runs.rundir import create_run_dir
from loratui.tiny_models import LLM_FAMILIES
from loratui.train.job import WorkerJob
from loratui.train.llm.trainer import run_training

LLAMA_STYLE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
EXPECTED = {  # family -> (config class, target_modules as adapter_config.json lists them, target_parameters)
    "llama3": ("LlamaConfig", LLAMA_STYLE, None),
    "qwen2.5": ("Qwen2Config", LLAMA_STYLE, None),
    "qwen3": ("Qwen3Config", LLAMA_STYLE, None),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        ["k_proj", "o_proj", "q_proj", "v_proj"],
        ["experts.down_proj", "experts.gate_up_proj"],
    ),
    "gemma2": ("Gemma2Config", LLAMA_STYLE, None),
    "gemma3": ("Gemma3TextConfig", LLAMA_STYLE, None),
    "mistral": ("MistralConfig", LLAMA_STYLE, None),
    "phi3": ("Phi3Config", ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"], None),
}
#: how each family renders [user "Hi there", assistant "Hello!"] (a part of it)
RENDERED = {
    "llama3": "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
    "qwen2.5": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n",
    "qwen3": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!<|im_end|>",
    "qwen3-moe": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello!",
    "gemma2": "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "gemma3": "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "mistral": "<s>[INST] Hi there[/INST] Hello!</s>",
    "phi3": "<|user|>\nHi there<|end|>\n<|assistant|>\nHello!<|end|>\n",
}
CHAT = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
IDS = torch.tensor([[5, 300, 301, 302, 500, 600, 7, 8]])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _job(config: Path, resume_from: Path | None = None, run=None) -> WorkerJob:
    resolved = load_config(config)
    run = run or create_run_dir(Path(resolved.config.runs_dir), resolved.config.name)
    return WorkerJob(run, resolved, resume_from, False)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def test_the_family_list_is_covered() -> None:
    assert set(LLM_FAMILIES) == set(EXPECTED) == set(RENDERED)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_fixture_is_the_real_architecture_with_its_chat_template(family: str, tiny_llm) -> None:
    from transformers import AutoConfig, AutoTokenizer

    folder = tiny_llm(family)
    assert type(AutoConfig.from_pretrained(folder, local_files_only=True)).__name__ == EXPECTED[family][0]
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert RENDERED[family] in tokenizer.apply_chat_template(CHAT, tokenize=False)
    text = "头痛 What helps a sore throat?"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


END_OF_TURN = {
    "llama3": "<|eot_id|>",
    "qwen2.5": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "qwen3-moe": "<|im_end|>",
    "gemma2": "<end_of_turn>",
    "gemma3": "<end_of_turn>",
    "mistral": "</s>",
    "phi3": "<|end|>",
}


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_loss_mask_covers_each_answer_and_its_end_of_turn(family: str, tiny_llm) -> None:
    from transformers import AutoTokenizer

    from loratui.data.text_dataset import Message, TextRecord
    from loratui.models.llm.chat import IGNORE_INDEX, choose_template, encode_record

    tokenizer = AutoTokenizer.from_pretrained(tiny_llm(family), local_files_only=True)
    template, origin = choose_template(tokenizer, None)
    assert origin == "tokenizer"
    turns = [("system", "Be careful."), ("user", "Q one?"), ("assistant", "A one."), ("user", "Q two?")]
    messages = [Message(role, text) for role, text in [*turns, ("assistant", "A two.")]]
    encoded = encode_record(
        TextRecord("x", 1, "chat", messages=messages), tokenizer, template, train_on_prompt=False
    )
    runs, current = [], []
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs, current = [*runs, current], []
    runs = [tokenizer.decode(run) for run in [*runs, current] if run]
    assert len(runs) == 2 and "A one." in runs[0] and "A two." in runs[1], runs
    for run in runs:
        assert "Q " not in run and "careful" not in run
        assert END_OF_TURN[family] in run and run.index(END_OF_TURN[family]) > run.index("A "), run


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_family_trains_resumes_exports_and_merges(family: str, tiny_llm, tmp_path: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratui.export.llm_export import export_adapter
    from loratui.models.llm.loading import load_base
    from loratui.sample.llm_sample import sample_text

    base = tiny_llm(family)
    data = write_jsonl(tmp_path / "data" / "chat.jsonl", records("chat", 6))
    common = {"max_steps": 2, "learning_rate": 0.01, "max_seq_len": 128}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight_yaml = write_llm_yaml(tmp_path / "a", base, data, **common)
    straight = run_training(_job(straight_yaml), console=False)
    assert straight.state == "finished" and straight.step == 2

    # exact resume: stop after step 1, resume to step 2
    resumed_yaml = write_llm_yaml(tmp_path / "b", base, data, **common)
    job = _job(resumed_yaml)
    assert run_training(job, stop=StopAfter(1), console=False).state == "stopped"
    again = run_training(_job(resumed_yaml, job.run.latest_checkpoint(), job.run), console=False)
    assert again.state == "finished"
    trained = adapter_tensors(straight.adapter_dir)
    assert max_diff(trained, adapter_tensors(again.adapter_dir)) <= 1e-6

    # adapter_config.json names targets as PEFT writes them; PEFT loads every tensor
    config = json.loads((straight.adapter_dir / "adapter_config.json").read_text())
    _, modules, parameters = EXPECTED[family]
    assert config["target_modules"] == modules
    assert (config.get("target_parameters") or None) == parameters
    assert not any(".gate." in k or "router" in k for k in trained)  # an MoE router stays frozen
    model, _, _ = load_base(str(base))
    plain = _logits(model)
    loaded = PeftModel.from_pretrained(model, str(straight.adapter_dir))
    state = loaded.state_dict()
    for key, tensor in trained.items():
        name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
            ".lora_B.weight", ".lora_B.default.weight"
        )
        assert torch.equal(state[name], tensor), key
    assert len([k for k in state if ".lora_" in k]) == len(trained)
    expected = _logits(loaded)
    assert (expected - plain).abs().max() > 1e-4  # the adapter changes the output
    torch.testing.assert_close(_logits(straight.model), expected, rtol=1e-5, atol=1e-5)

    # merged model: base + adapter in one folder, with the family's chat template
    exported = export_adapter(straight.adapter_dir, merge=True, dtype="fp32", out=tmp_path / "m")
    assert exported.kind == "merged"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    torch.testing.assert_close(_logits(merged), expected, rtol=1e-4, atol=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "m", local_files_only=True)
    assert RENDERED[family] in tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert (straight.adapter_dir / "chat_template.jinja").read_text() == tokenizer.chat_template

    # `loratui sample` loads the adapter onto the base and answers through the family's template
    sample = sample_text(base=str(base), lora=[str(straight.adapter_dir)], prompt="Hi", max_new_tokens=3)
    assert isinstance(sample.answer, str) and not sample.notes


@pytest.mark.parametrize(
    ("family", "targets", "dropout"),
    [(f, None, 0.0) for f in LLM_FAMILIES] + [("qwen3-moe", None, 0.1), ("phi3", ["all-linear"], 0.0)],
)
def test_planner_lora_count_matches_the_trainer(family, targets, dropout, tiny_llm) -> None:
    from loratui.memory.estimate import planner_for
    from loratui.models.llm.loading import load_base
    from loratui.models.llm.lora import setup_lora

    cfg = TrainConfig(
        task_type="text-generation",
        model_family="llm",
        base_model=str(tiny_llm(family)),
        target_modules=targets,
        lora_dropout=dropout,
        lora_rank=4,
    )
    model = setup_lora(cfg, load_base(cfg.base_model)[0])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    summary = planner_for(cfg).summary
    assert summary.lora_params(4, targets, lora_dropout=dropout) == trainable
    assert sum(
        per_rank * count for per_rank, count in summary.lora_tensors(targets, lora_dropout=dropout)
    ) * 4 == (trainable)


def test_moe_experts_are_adapted_or_left_out_out_loud(tiny_llm) -> None:
    from loratui.models.llm.loading import load_base
    from loratui.models.llm.lora import setup_lora

    base = str(tiny_llm("qwen3-moe"))

    def run(**values):
        notes: list[tuple[str, str]] = []
        cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model=base, **values)
        model = setup_lora(cfg, load_base(base)[0], notify=lambda level, text: notes.append((level, text)))
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return names, notes

    names, notes = run()
    assert any(".experts." in n for n in names) and notes[0][0] == "info" and "router" in notes[0][1]
    names, notes = run(lora_dropout=0.1)
    assert not any(".experts." in n for n in names)
    assert notes[0][0] == "warning" and "NOT adapted" in notes[0][1] and "lora_dropout: 0" in notes[0][1]
    names, notes = run(target_modules=["q_proj", "v_proj"])
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"} and "'experts'" in notes[0][1]
    names, _ = run(target_modules=["q_proj", "experts"])
    assert any(".experts." in n for n in names)
    with pytest.raises(ValueError, match="lora_dropout: 0"):
        run(target_modules=["experts"], lora_dropout=0.1)


def test_unknown_architecture_is_refused_with_what_to_set(tmp_path: Path, monkeypatch) -> None:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from loratui.memory.estimate import estimate_peak
    from loratui.models.llm.lora import setup_lora

    config = GPTNeoXConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = GPTNeoXForCausalLM(config)
    config.save_pretrained(tmp_path / "neox")
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    planned = TrainConfig(task_type="text-generation", model_family="llm", base_model=str(tmp_path / "neox"))
    notes = estimate_peak(planned, device="cpu").notes
    assert any("trainer will refuse" in n and "target_modules" in n for n in notes), notes
    cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model="x")
    with pytest.raises(UnsupportedArchitecture) as err:
        setup_lora(cfg, model)
    message = str(err.value)
    assert "'gpt_neox'" in message and "query_key_value" in message and "target_modules" in message
    assert "Qwen3-MoE (qwen3_moe)" in message and "Phi-3 / Phi-4 (phi3)" in message
    with pytest.raises(ValueError, match="match no linear layer.*query_key_value"):
        plan_targets("gpt_neox", ["gpt_neox.layers.0.attention.query_key_value"], [], ["q_proj"])
    named = setup_lora(cfg.model_copy(update={"target_modules": ["query_key_value"]}), model)
    assert any("query_key_value.lora_A" in n for n, _ in named.named_parameters())


def test_all_linear_writes_short_names_that_peft_loads(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    from loratui.models.llm.loading import load_base

    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 4))
    config = write_llm_yaml(tmp_path, tiny_llama, data, max_steps=1, target_modules="all-linear")
    result = run_training(_job(config), console=False)
    written = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert written["target_modules"] == LLAMA_STYLE
    tensors = adapter_tensors(result.adapter_dir)
    assert len(tensors) == 2 * 7 * 2  # A and B, 7 layers, 2 decoder blocks
    loaded = PeftModel.from_pretrained(load_base(str(tiny_llama))[0], str(result.adapter_dir))
    assert len([k for k in loaded.state_dict() if ".lora_" in k]) == len(tensors)
    paths = [f"model.layers.0.{n}" for n in ("self_attn.q_proj", "mlp.up_proj")] + ["lm_head"]
    assert plan_targets("llama", paths, [], ["all-linear"]).modules == ["q_proj", "up_proj"]
    assert plan_targets("llama", paths, [], ["all-linear", "lm_head"]).modules == [
        "q_proj",
        "up_proj",
        "lm_head",
    ]


def test_moe_run_log_says_what_happened_to_the_experts(tiny_llm, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 4))
    config = write_llm_yaml(tmp_path, tiny_llm("qwen3-moe"), data, max_steps=1, lora_dropout=0.05)
    job = _job(config)
    assert run_training(job, console=False).state == "finished"
    warnings = [e["message"] for e in read_events(job.run.events_path) if e["type"] == "warning"]
    assert any("MoE experts are NOT adapted" in w for w in warnings)
    assert not any(".experts." in k for k in adapter_tensors(tmp_path / "adapter"))


def test_resuming_a_checkpoint_with_other_targets_says_which(tiny_llama: Path, tmp_path: Path) -> None:
    """A run started with q/k/v/o only (the earlier default) does not resume silently with fresh MLP LoRAs."""
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 4))
    old = write_llm_yaml(
        tmp_path, tiny_llama, data, max_steps=2, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    job = _job(old)
    assert run_training(job, stop=StopAfter(1), console=False).state == "stopped"
    new = write_llm_yaml(tmp_path, tiny_llama, data, max_steps=2)
    with pytest.raises(ValueError, match=r"target_modules: \['k_proj', 'o_proj', 'q_proj', 'v_proj'\]"):
        run_training(_job(new, job.run.latest_checkpoint(), job.run), console=False)


def test_target_rules_without_a_model() -> None:
    """A llama-named model type outside the table gets the Llama names with a warning; routers are never
    adapted by all-linear; experts named explicitly go to target_parameters."""
    layer = "model.layers.0."
    linear = [
        layer + n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
    ]
    linear += [layer + n for n in ("mlp.shared_expert.up_proj", "mlp.shared_expert_gate", "mlp.gate")]
    experts = [layer + "mlp.experts.gate_up_proj", layer + "mlp.experts.down_proj"]
    plan = plan_targets("olmoe_like", [*linear, "lm_head"], experts, None)
    assert plan.modules == ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]
    assert plan.parameters == ["experts.down_proj", "experts.gate_up_proj"]
    assert [level for level, _ in plan.notes] == ["warning", "info"] and "olmoe_like" in plan.notes[0][1]
    every = plan_targets("olmoe_like", [*linear, "lm_head"], experts, ["all-linear"])
    assert every.modules == ["k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    named = plan_targets("qwen3_moe", linear, experts, ["q_proj", "mlp.experts.down_proj"])
    assert named.modules == ["q_proj"] and named.parameters == ["experts.down_proj"]


def test_moe_step_with_adapted_experts_traces_on_the_meta_device(tiny_llm) -> None:
    """GPU estimates trace on the meta device, where PEFT's fold of the expert LoRA disables autocast for a
    "meta" device type; the trace runs and sees the adapted experts' extra memory."""
    from loratui.memory.arch import arch_from_config
    from loratui.memory.probe import trace_llm
    from loratui.memory.regime import Point, Regime

    cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model=str(tiny_llm("qwen3-moe")))
    config = arch_from_config(cfg, "llm").configs["model"]
    point = [Point(1, 32, 4)]
    adapted = trace_llm(config, 1, Regime("amp16", targets=("all-linear",)), point, "meta")[0]
    left_out = trace_llm(config, 1, Regime("amp16", dropout=True, targets=("all-linear",)), point, "meta")[0]
    assert adapted.gradients > left_out.gradients > 0
