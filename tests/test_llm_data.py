"""LLM data: formats, loss masks, EOS, truncation, packing, validation split and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from llm_helpers import QA, records, write_jsonl

from loratui.data.text_dataset import Message, TextRecord
from loratui.models.llm.batches import LLMDataError, build_llm_data, collate, pack
from loratui.models.llm.chat import (
    IGNORE_INDEX,
    PLAIN_CHAT_TEMPLATE,
    Encoded,
    choose_template,
    encode_record,
    prompt_ids,
)
from loratui.models.llm.loading import BaseSource, load_tokenizer

FORMATS = ["prompt_response", "alpaca", "chat", "sharegpt", "text"]


@pytest.fixture(scope="module")
def tok(tiny_llama: Path):
    return load_tokenizer(BaseSource(str(tiny_llama), "hf-folder", tiny_llama))


def _targets(tok, enc: Encoded) -> str:
    return tok.decode(
        [t for t, label in zip(enc.input_ids, enc.labels, strict=True) if label != IGNORE_INDEX]
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_encodes_with_answer_only_targets(tmp_path: Path, tok, fmt: str) -> None:
    data = build_llm_data(
        write_jsonl(tmp_path / "d.jsonl", records(fmt, 4)), tok, tok.chat_template, max_seq_len=512
    )
    assert len(data.train) == 4 and not data.warnings
    unit = data.train[0]
    assert unit.labels[0] == IGNORE_INDEX
    assert unit.input_ids[-1] == tok.eos_token_id and unit.labels[-1] == tok.eos_token_id
    enc = Encoded(unit.input_ids, unit.labels)
    question, answer = QA[0]
    if fmt == "text":
        assert question in _targets(tok, enc)  # raw text: everything is a target
    else:
        assert _targets(tok, enc).strip() == f"{answer} {tok.eos_token}"  # prompt tokens masked
        assert question not in _targets(tok, enc)


def test_prompt_tokens_masked_in_multi_turn_chat_and_plain_template(tok) -> None:
    msgs = [
        Message("system", "Be brief."),
        Message("user", "头痛？"),
        Message("assistant", "多休息。"),
        Message("user", "And fever?"),
        Message("assistant", "See a doctor."),
    ]
    record = TextRecord("f.jsonl", 1, "chat", msgs)
    for template in (tok.chat_template, PLAIN_CHAT_TEMPLATE):
        enc = encode_record(record, tok, template, train_on_prompt=False)
        targets = _targets(tok, enc)
        assert "多休息。" in targets and "See a doctor." in targets
        assert "头痛" not in targets and "fever" not in targets and "Be brief" not in targets
        assert targets.count(tok.eos_token) == 2
        full = encode_record(record, tok, template, train_on_prompt=True)
        assert full.input_ids == enc.input_ids and full.num_targets == len(full.input_ids) - 1
        # The prompt used for generation is exactly the training text up to the first answer.
        head = prompt_ids(tok, template, [{"role": "user", "content": "头痛？"}])
        assert len(head) > 3


def test_plain_template_is_chosen_without_a_tokenizer_template(tok, tmp_path: Path) -> None:
    saved = tok.chat_template
    try:
        tok.chat_template = None
        assert choose_template(tok, None) == (PLAIN_CHAT_TEMPLATE, "plain")
        assert choose_template(tok, "{{ x }}") == ("{{ x }}", "config")
        (tmp_path / "t.jinja").write_text("{{ y }}")
        assert choose_template(tok, str(tmp_path / "t.jinja"))[0] == "{{ y }}"
    finally:
        tok.chat_template = saved
    assert choose_template(tok, None)[1] == "tokenizer"


def test_missing_pad_token_uses_eos(tiny_llama_nopad: Path) -> None:
    tok = load_tokenizer(BaseSource(str(tiny_llama_nopad), "hf-folder", tiny_llama_nopad))
    assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "right"


def test_truncation_is_counted_and_all_too_long_is_an_error(tmp_path: Path, tok) -> None:
    rows = records("prompt_response", 6)
    rows[0]["response"] = "很长的回答。" * 60
    data = build_llm_data(write_jsonl(tmp_path / "d.jsonl", rows), tok, tok.chat_template, max_seq_len=160)
    assert data.stats["truncated"] == 1
    assert any("1 of 6 samples are longer than max_seq_len=160" in w for w in data.warnings)
    assert all(len(u.input_ids) <= 160 for u in data.train)
    with pytest.raises(LLMDataError, match="every sample .* is longer than max_seq_len=16"):
        build_llm_data(tmp_path / "d.jsonl", tok, tok.chat_template, max_seq_len=16)


def test_bad_lines_are_skipped_with_file_and_line(tmp_path: Path, tok) -> None:
    good = [json.dumps(r, ensure_ascii=False) for r in records("prompt_response", 3)]
    lines = [
        good[0],
        '{"prompt": "broken", "response": ',  # line 2: malformed JSON
        json.dumps({"prompt": "no answer"}),  # line 3: missing field
        json.dumps({"prompt": "q", "response": "  "}),  # line 4: empty response
        good[1],
        json.dumps({"instruction": "alpaca in the same file", "output": "ok"}),  # mixed formats
        good[2],
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8") + b'{"prompt": "caf\xe9", "response": "x"}\n')
    data = build_llm_data(path, tok, tok.chat_template, max_seq_len=256)
    assert len(data.train) == 4
    skipped = next(w for w in data.warnings if w.startswith("skipped 4 unusable record(s)"))
    for where in ("bad.jsonl:2", "bad.jsonl:3", "bad.jsonl:4", "bad.jsonl:8"):
        assert where in skipped
    assert any("mix" in w.lower() for w in data.warnings)


def test_no_usable_records_is_an_error(tmp_path: Path, tok) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": \n{"foo": 1}\n', encoding="utf-8")
    with pytest.raises(LLMDataError, match="no usable training records.*d.jsonl:1"):
        build_llm_data(path, tok, tok.chat_template, max_seq_len=256)
    with pytest.raises(LLMDataError, match="not found"):
        build_llm_data(tmp_path / "missing", tok, tok.chat_template, max_seq_len=256)


def test_folder_of_files_and_validation_split(tmp_path: Path, tok) -> None:
    write_jsonl(tmp_path / "a.jsonl", records("chat", 6))
    (tmp_path / "b.json").write_text(json.dumps(records("alpaca", 4), ensure_ascii=False), encoding="utf-8")
    one = build_llm_data(tmp_path, tok, tok.chat_template, max_seq_len=256, val_split=0.2, seed=3)
    two = build_llm_data(tmp_path, tok, tok.chat_template, max_seq_len=256, val_split=0.2, seed=3)
    assert (len(one.train), len(one.val)) == (8, 2)
    assert [u.input_ids for u in one.val] == [u.input_ids for u in two.val]


def test_packing_keeps_samples_apart(tmp_path: Path, tok) -> None:
    samples = [
        Encoded(list(range(1, n + 1)), [IGNORE_INDEX] + list(range(2, n + 1))) for n in (5, 9, 3, 7, 2)
    ]
    units = pack(samples, 12)
    assert all(len(u.input_ids) <= 12 for u in units)
    assert sum(u.num_samples for u in units) == 5
    assert sum(u.num_targets for u in units) == sum(s.num_targets for s in samples)
    for unit in units:
        starts = [i for i, p in enumerate(unit.position_ids) if p == 0]
        assert all(unit.labels[i] == IGNORE_INDEX for i in starts)  # never predict across a boundary
    batch = collate(units, pad_id=0)
    assert batch.attention_mask is None and batch.position_ids.shape == batch.input_ids.shape
