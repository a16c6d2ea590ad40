"""Preference datasets: the pair formats peers accept, `loratui check --task preference` with line numbers, the
config keys and their aliases, and the token masks of both sides of a pair."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import TrainConfig
from loratui.data.preference_dataset import read_preference_dataset

runner = CliRunner()

ROWS = [
    # TRL standard: prompt / chosen / rejected strings (+ system)
    {
        "system": "Be brief.",
        "prompt": "What helps a cold?",
        "chosen": "Rest and fluids.",
        "rejected": "Nothing.",
    },
    # TRL conversational with an explicit prompt
    {
        "prompt": [{"role": "user", "content": "Capital of France?"}],
        "chosen": [{"role": "assistant", "content": "Paris."}],
        "rejected": [{"role": "assistant", "content": "Lyon."}],
    },
    # TRL implicit prompt: whole conversations sharing the prompt turns
    {
        "chosen": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ],
        "rejected": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "5"},
        ],
    },
    # LLaMA-Factory sharegpt: conversations + chosen/rejected message objects
    {
        "conversations": [{"from": "human", "value": "Name a colour."}],
        "chosen": {"from": "gpt", "value": "Blue."},
        "rejected": {"from": "gpt", "value": "Seven."},
    },
    # LLaMA-Factory alpaca style
    {"instruction": "Translate", "input": "chat", "chosen": "cat", "rejected": "dog"},
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_every_pair_format_is_read_into_prompt_and_answers(tmp_path: Path) -> None:
    path = _write(tmp_path / "pairs.jsonl", [json.dumps(r) for r in ROWS])
    scan = read_preference_dataset(path)
    assert not scan.has_errors
    fmts = [r.fmt for r in scan.records]
    assert fmts == ["prompt_pair", "messages_pair", "implicit_messages", "sharegpt_pair", "prompt_pair"]
    first, _, implicit, sharegpt, alpaca = scan.records
    assert [(m.role, m.content) for m in first.prompt] == [
        ("system", "Be brief."),
        ("user", "What helps a cold?"),
    ]
    assert [m.content for m in first.chosen] == ["Rest and fluids."]
    assert [m.content for m in implicit.prompt] == ["Hi", "Hello!", "2+2?"]
    assert [m.content for m in implicit.chosen] == ["4"] and [m.content for m in implicit.rejected] == ["5"]
    assert sharegpt.prompt[-1].content == "Name a colour." and sharegpt.rejected[0].content == "Seven."
    assert alpaca.prompt[-1].content == "Translate\n\nchat"


def test_check_task_preference_reports_bad_lines(tmp_path: Path) -> None:
    lines = [
        json.dumps(ROWS[0]),
        json.dumps({"prompt": "q", "response": "an SFT record"}),  # 2: no chosen/rejected
        "{broken",  # 3
        json.dumps({"prompt": "q", "chosen": "  ", "rejected": "b"}),  # 4: empty chosen
        json.dumps(
            {  # 5: the two conversations do not share the prompt
                "chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
                "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}],
            }
        ),
        json.dumps({"prompt": "same", "chosen": "s", "rejected": "s"}),  # 6: identical answers
        json.dumps({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}),  # 7
    ]
    path = _write(tmp_path / "pairs.jsonl", lines)
    result = runner.invoke(app, ["check", str(path), "--task", "preference", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.output)
    assert report["task"] == "preference" and report["summary"]["pairs"] == 2
    where = {f["code"]: [e["line"] for e in f["examples"]] for f in report["findings"]}
    assert where["not_a_preference_record"] == [2]
    assert where["jsonl_parse_error"] == [3]
    assert where["empty_response"] == [4]
    assert where["pair_prompt_mismatch"] == [5]
    assert where["identical_pair"] == [6]
    assert where["bad_role"] == [7]
    severity = {f["code"]: f["severity"] for f in report["findings"]}
    assert severity["identical_pair"] == "warning" and severity["not_a_preference_record"] == "error"
    # without --task the chosen/rejected records are recognised; --task text reads them as SFT records
    assert json.loads(runner.invoke(app, ["check", str(path), "--json"]).output)["task"] == "preference"
    assert (
        json.loads(runner.invoke(app, ["check", str(path), "--task", "text", "--json"]).output)["task"]
        == "text"
    )
    clean = _write(tmp_path / "clean.jsonl", [json.dumps(r) for r in ROWS])
    assert runner.invoke(app, ["check", str(clean), "--task", "preference"]).exit_code == 0


def test_config_keys_and_aliases_from_trl_llama_factory_and_axolotl(tmp_path: Path) -> None:
    from loratui.config import load_config

    path = tmp_path / "dpo.yaml"
    path.write_text(
        "task_type: text-generation\nbase_model: x\nstage: dpo\npref_beta: 0.2\nloss_type: ipo\n"
        "orpo_alpha: 0.3\n",
        encoding="utf-8",
    )
    cfg = load_config(path).config
    assert (cfg.method, cfg.pref_beta, cfg.pref_loss, cfg.orpo_lambda) == ("dpo", 0.2, "ipo", 0.3)
    path.write_text(
        "task_type: text-generation\nbase_model: x\nrl: dpo\ndpo_beta: 0.05\ndpo_label_smoothing: 0.1\n",
        encoding="utf-8",
    )
    cfg = load_config(path).config
    assert (cfg.method, cfg.pref_beta, cfg.label_smoothing) == ("dpo", 0.05, 0.1)
    with pytest.raises(ValueError, match="label_smoothing applies to pref_loss: sigmoid only"):
        TrainConfig(task_type="text-generation", method="dpo", pref_loss="ipo", label_smoothing=0.1)


def test_keys_of_another_method_are_reported_not_dropped() -> None:
    from loratui.config import ResolvedConfig
    from loratui.config.task_keys import ignored_settings

    cfg = TrainConfig(task_type="text-generation", method="orpo", pref_beta=0.3, packing=True)
    resolved = ResolvedConfig(cfg, {"pref_beta": "config x.yaml:4", "packing": "config x.yaml:5"}, "llm")
    found = {item.key: item.message() for item in ignored_settings(resolved)}
    assert set(found) == {"pref_beta", "packing"}
    assert "method is orpo" in found["pref_beta"]


def test_both_sides_share_the_masked_prompt_and_only_answers_are_targets(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    from loratui.data.text_dataset import Message
    from loratui.models.llm.chat import IGNORE_INDEX, choose_template
    from loratui.models.llm.preference_data import encode_side

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    template, _ = choose_template(tokenizer, None)
    prompt = [Message("user", "What helps a cold?")]
    chosen = encode_side(tokenizer, template, prompt, [Message("assistant", "Rest and fluids.")])
    rejected = encode_side(tokenizer, template, prompt, [Message("assistant", "Nothing at all, really.")])
    first_target = [label != IGNORE_INDEX for label in chosen.labels].index(True)
    assert first_target > 3
    assert chosen.input_ids[:first_target] == rejected.input_ids[:first_target]  # the same prompt tokens
    assert all(label == IGNORE_INDEX for label in rejected.labels[:first_target])
    answer = tokenizer.decode([t for t in chosen.labels if t != IGNORE_INDEX], skip_special_tokens=True)
    assert answer.strip() == "Rest and fluids."
    assert chosen.labels[-1] == tokenizer.eos_token_id


def test_the_training_view_model_keeps_the_reward_margins_of_preference_steps() -> None:
    from loratui.tui.run_model import RunModel
    from loratui.tui.testing import synthetic_events

    model = RunModel("dpo")
    model.feed(synthetic_events(steps=30, total_steps=30, preference=True))
    view = model.view()
    assert len(view.margin_series) == 30 and len(view.smooth_margin_series) == 30
    assert view.reward_margin == view.margin_series[-1] and 0 < view.reward_accuracy <= 1
    plain = RunModel("sft")
    plain.feed(synthetic_events(steps=30, total_steps=30))
    assert plain.view().margin_series == () and plain.view().reward_accuracy is None


def test_the_dpo_example_config_validates() -> None:
    from loratui.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "examples" / "llm_dpo.yaml").config
    assert (cfg.method, cfg.pref_beta, cfg.pref_loss, cfg.task_type) == (
        "dpo",
        0.1,
        "sigmoid",
        "text-generation",
    )
    assert cfg.init_lora and cfg.batch_size == 2


def test_plain_progress_lines_show_the_margin_and_accuracy() -> None:
    from loratui.runs.follow import format_event

    line = format_event(
        {"type": "step", "step": 3, "loss": 0.5, "lr": 1e-4, "reward_margin": 0.25, "reward_accuracy": 0.75}
    )
    assert line is not None and "margin 0.250 acc 75%" in line
    assert "margin" not in (format_event({"type": "step", "step": 3, "loss": 0.5, "lr": 1e-4}) or "")


def test_training_refuses_a_preference_run_on_bad_pairs_before_it_starts(tmp_path: Path) -> None:
    from loratui.config import ResolvedConfig
    from loratui.train.process.preflight import run_preflight

    data = _write(
        tmp_path / "pairs.jsonl", [json.dumps(ROWS[0]), json.dumps({"prompt": "q", "response": "a"})]
    )
    cfg = TrainConfig(task_type="text-generation", method="dpo", train_data_dir=str(data))
    result = run_preflight(ResolvedConfig(cfg, {}, "llm"))
    assert [f.code for f in result.errors] == ["not_a_preference_record"]
    assert result.errors[0].examples[0].line == 2
    sft = run_preflight(ResolvedConfig(cfg.model_copy(update={"method": "sft"}), {}, "llm"))
    assert "not_a_preference_record" not in [f.code for f in sft.errors]


def test_check_with_a_dpo_config_runs_the_preference_checks(tmp_path: Path) -> None:
    data = _write(
        tmp_path / "pairs.jsonl", [json.dumps(ROWS[0]), json.dumps({"prompt": "q", "response": "a"})]
    )
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(f"task_type: text-generation\nmethod: dpo\ntrain_data_dir: {data}\n", encoding="utf-8")
    result = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    report = json.loads(result.output)
    assert result.exit_code == 1 and report["task"] == "preference"
    assert [f["code"] for f in report["findings"] if f["severity"] == "error"] == ["not_a_preference_record"]


CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_chatml_template_masks_the_whole_prompt_including_earlier_answers(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    from loratui.data.text_dataset import Message
    from loratui.models.llm.chat import IGNORE_INDEX
    from loratui.models.llm.preference_data import encode_side

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama))
    prompt = [
        Message("system", "Be brief."),
        Message("user", "Hi"),
        Message("assistant", "Hello there"),  # an earlier answer is part of the prompt: never a target
        Message("user", "2+2?"),
    ]
    side = encode_side(tokenizer, CHATML, prompt, [Message("assistant", "Four.")])
    targets = tokenizer.decode([t for t in side.labels if t != IGNORE_INDEX], skip_special_tokens=True)
    assert "Hello there" not in targets and targets.startswith("Four.") and "<|im_end|>" in targets


def test_cutting_pairs_keeps_every_pair_and_cuts_both_sides() -> None:
    from loratui.models.llm.batches import Unit
    from loratui.models.llm.preference_data import Pair, PreferenceData

    long = Unit(list(range(10)), [-100] * 4 + list(range(4, 10)), 6)
    short = Unit([1, 2, 3], [-100, 2, 3], 2)
    data = PreferenceData([Pair(long, short), Pair(short, long)], [])
    data.cut(6)
    assert len(data.train) == 2
    assert data.train[0].chosen.input_ids == list(range(6)) and data.train[0].chosen.num_targets == 2
    assert data.train[0].rejected is short and data.train[1].rejected.num_targets == 2
    assert data.target_tokens([0, 1]) == 8


def test_unpaired_kto_records_are_read_for_kto_and_flagged_for_dpo(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": "What helps a cold?", "completion": "Rest and fluids.", "label": True}),
        json.dumps(
            {
                "prompt": [{"role": "user", "content": "Capital of France?"}],
                "completion": [{"role": "assistant", "content": "Lyon."}],
                "label": False,
            }
        ),
        json.dumps({"prompt": "q", "completion": "a", "label": "yes"}),  # 3: label is not a boolean
        json.dumps(ROWS[0]),  # 4: a pair (two KTO examples)
    ]
    path = _write(tmp_path / "kto.jsonl", lines)
    scan = read_preference_dataset(path, paired=False)
    assert [(r.line, r.fmt, r.paired) for r in scan.records] == [
        (1, "unpaired", False),
        (2, "unpaired", False),
        (4, "prompt_pair", True),
    ]
    assert [len(r.answers()) for r in scan.records] == [1, 1, 2]
    assert scan.records[1].rejected[0].content == "Lyon." and not scan.records[1].chosen
    report = json.loads(runner.invoke(app, ["check", str(path), "--json"]).output)  # detected: kto
    assert report["task"] == "kto"
    where = {f["code"]: [e["line"] for e in f["examples"]] for f in report["findings"]}
    assert where["missing_fields"] == [3] and "unpaired_record" not in where
    dpo = json.loads(runner.invoke(app, ["check", str(path), "--task", "preference", "--json"]).output)
    where = {f["code"]: [e["line"] for e in f["examples"]] for f in dpo["findings"]}
    assert where["unpaired_record"] == [1, 2] and dpo["summary"]["pairs"] == 1
