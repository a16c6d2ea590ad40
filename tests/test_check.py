"""`loratui check`: every finding on generated bad datasets, exit codes, JSON output, nothing modified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import (
    BAD_IMAGE_FILES as F,
)
from data_fixtures import (
    build_bad_image_dataset,
    build_bad_text_dataset,
    build_good_image_dataset,
    build_good_text_dataset,
    pattern,
    save,
    tree_digest,
    write_text,
)
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.data.check import run_checks
from loratui.data.findings import Report

runner = CliRunner()


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bad_image_dataset(tmp_path_factory.mktemp("bad_images"))


@pytest.fixture(scope="module")
def bad_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bad_text_dataset(tmp_path_factory.mktemp("bad_text"))


def paths(report: Report, code: str) -> set[str]:
    finding = report.by_code(code)
    assert finding is not None, f"{code} not reported; got {sorted(report.codes())}"
    return {e.path for e in finding.examples}


def lines(report: Report, code: str) -> set[tuple[str, int | None]]:
    finding = report.by_code(code)
    assert finding is not None, f"{code} not reported; got {sorted(report.codes())}"
    return {(e.path, e.line) for e in finding.examples}


@pytest.mark.parametrize("deep", [False, True])
def test_bad_image_dataset_findings(bad_images: Path, deep: bool) -> None:
    before = tree_digest(bad_images)
    r = run_checks(bad_images, trigger_word="mychar", caption_extensions=(".txt",), deep=deep)
    assert tree_digest(bad_images) == before
    assert r.task == "image" and r.exit_code == 1 and not r.unusable
    sev = {f.code: f.severity for f in r.findings}
    # files
    assert paths(r, "corrupt_image") == {F["corrupt"]}
    assert paths(r, "truncated_image") == {F["trunc_png"], F["trunc_jpg"]}
    assert paths(r, "decompression_bomb") == {F["bomb"]}
    assert paths(r, "tiny_image") == {F["tiny"]}
    assert paths(r, "image_too_small") == {F["wide"]}
    assert paths(r, "extreme_aspect_ratio") == {F["wide"]}
    assert paths(r, "cmyk_image") == {F["cmyk"]}
    assert paths(r, "high_bit_depth") == {F["gray16"]}
    assert paths(r, "alpha_channel") == {F["rgba"]}
    assert paths(r, "animated_image") == {F["anim"]}
    assert paths(r, "exif_rotation") == {F["rotated"]}
    assert len(paths(r, "exact_duplicate") & {F["dup"], F["dup_src"]}) == 1
    assert "same bytes as" in r.by_code("exact_duplicate").examples[0].detail
    assert {F["near"], F["near_src"]} & paths(r, "near_duplicate")
    assert F["dup"] not in paths(r, "near_duplicate") and F["dup_src"] not in paths(r, "near_duplicate")
    # captions
    assert paths(r, "missing_caption") == {F["nocap"], F["meta2"], F["meta3"]}
    assert paths(r, "wrong_caption_extension") == {F["wrongext"]}
    assert "wrongext.caption" in r.by_code("wrong_caption_extension").examples[0].detail
    assert paths(r, "orphan_caption") == {F["orphan"]}
    assert lines(r, "caption_not_utf8") == {(F["latin1_caption"], 1)}
    assert paths(r, "empty_caption") == {F["empty_caption"]}
    assert paths(r, "trigger_word_missing") == {"10_good/notrigger.txt"}
    assert paths(r, "caption_too_long") == {"10_good/longcap.txt"}
    assert "approximat" in r.by_code("caption_too_long").message
    assert lines(r, "caption_conflict") == {(F["meta1"], 2)}
    # metadata.csv with line numbers
    assert lines(r, "metadata_bad_quoting") == {("metadata.csv", 3)}
    assert lines(r, "metadata_wrong_column_count") == {("metadata.csv", 4)}
    assert lines(r, "metadata_duplicate_row") == {("metadata.csv", 5)}
    assert lines(r, "metadata_missing_image") == {("metadata.csv", 6)}
    # kohya folders
    assert paths(r, "malformed_kohya_folder") == {
        F["malformed_nounderscore"],
        F["malformed_zero"],
        F["malformed_plain"],
    }
    assert r.by_code("kohya_folders").data == {"10_good": {"n_repeats": 10, "img_count": 24}}
    assert r.by_code("tag_frequency").data["tags"]["mychar"] >= 15
    # severities that decide the exit code
    for code in (
        "corrupt_image",
        "truncated_image",
        "decompression_bomb",
        "missing_caption",
        "wrong_caption_extension",
    ):
        assert sev[code] == "error"
    for code in ("exif_rotation", "cmyk_image", "high_bit_depth", "alpha_channel", "tag_frequency"):
        assert sev[code] == "info"
    # summary: 27 images, 24 in 10_good x 10 repeats + 3 single-repeat folders
    assert r.summary["images"] == 27
    assert r.summary["images_x_repeats"] == 24 * 10 + 3
    assert r.summary["steps_per_epoch"] == 243
    coverage = r.by_code("near_duplicate_coverage")
    assert (coverage is None) == deep
    if not deep:
        assert "JPEG" in coverage.message and "--deep" in coverage.fix


def test_default_caption_extensions_accept_dot_caption(bad_images: Path) -> None:
    r = run_checks(bad_images)
    assert r.by_code("wrong_caption_extension") is None
    assert r.summary["caption_sources"][".caption"] == 1


def test_bad_text_dataset_findings(bad_text: Path) -> None:
    before = tree_digest(bad_text)
    r = run_checks(bad_text, max_seq_len=12)
    assert tree_digest(bad_text) == before
    assert r.task == "text" and r.exit_code == 1
    assert lines(r, "jsonl_parse_error") == {("train.jsonl", 3)}
    assert lines(r, "empty_response") == {("train.jsonl", 4), ("extra.json", 7)}
    assert lines(r, "duplicate_record") == {("train.jsonl", 6)}
    assert lines(r, "text_not_utf8") == {("train.jsonl", 7)}
    assert lines(r, "missing_fields") == {("train.jsonl", 8)}
    assert lines(r, "unknown_format") == {("train.jsonl", 9)}
    assert paths(r, "mixed_formats") == {"train.jsonl"}
    assert r.summary["formats"]["train.jsonl"] == {"prompt_response": 3, "chat": 1}
    assert r.summary["records"] == 5
    assert r.by_code("token_lengths").data["max"] > 12
    assert r.summary["over_max_seq_len"] >= 1
    assert "approximate" in r.by_code("token_lengths").message


def test_text_token_counts_with_local_tokenizer(tmp_path: Path) -> None:
    from loratui.data.check import tokenizer_path_for
    from loratui.tiny_models.clip_tokenizer import write_clip_tokenizer

    model = tmp_path / "model"
    write_clip_tokenizer(model)
    data = build_good_text_dataset(tmp_path / "train.jsonl")
    tok = tokenizer_path_for(model, "text")
    assert tok == model
    r = run_checks(data, tokenizer_path=tok, max_seq_len=4)
    assert r.by_code("tokenizer_unavailable") is None
    assert r.summary["tokens"]["counted_with"] == str(model)
    assert r.summary["over_max_seq_len"] == 3 and r.exit_code == 0


def test_caption_length_with_model_tokenizer_via_config(tmp_path: Path) -> None:
    from loratui.tiny_models.clip_tokenizer import write_clip_tokenizer

    base = tmp_path / "sd"
    write_clip_tokenizer(base / "tokenizer")
    data = build_good_image_dataset(tmp_path / "data", n=2)
    write_text(data / "img1.txt", "mychar, " + ", ".join(f"word{i}" for i in range(40)))
    cfg = write_text(
        tmp_path / "train.yaml",
        f"task_type: image-generation\nbase_model: {base}\ntrain_data_dir: {data}\nresolution: 256\n"
        "batch_size: 2\ntrigger_word: mychar\n",
    )
    result = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["summary"]["resolution"] == 256 and out["summary"]["steps_per_epoch"] == 1
    assert out["summary"]["caption_tokens"]["counted_with"] == str(base / "tokenizer")
    codes = {f["code"] for f in out["findings"]}
    assert "caption_too_long" in codes and "tokenizer_unavailable" not in codes


def test_config_caption_extension_flags_the_other_one(tmp_path: Path) -> None:
    data = build_good_image_dataset(tmp_path / "data", n=2)
    cfg = write_text(
        tmp_path / "c.yaml",
        f"task_type: image-generation\ntrain_data_dir: {data}\ncaption_extension: .caption\n",
    )
    result = runner.invoke(app, ["check", "--config", str(cfg), "--json"])
    assert result.exit_code == 1
    found = {f["code"]: f for f in json.loads(result.stdout)["findings"]}
    assert {e["path"] for e in found["wrong_caption_extension"]["examples"]} == {"img0.png", "img1.jpg"}
    assert ".caption" in found["wrong_caption_extension"]["fix"]


# --- CLI exit codes and output ------------------------------------------------------------------


def test_cli_exit_1_and_json(bad_images: Path) -> None:
    before = tree_digest(bad_images)
    result = runner.invoke(app, ["check", str(bad_images), "--json", "--max-examples", "2"])
    assert result.exit_code == 1
    out = json.loads(result.stdout)
    assert out["exit_code"] == 1 and out["has_errors"] is True
    by_code = {f["code"]: f for f in out["findings"]}
    assert by_code["missing_caption"]["count"] == 3 and len(by_code["missing_caption"]["examples"]) == 2
    assert by_code["missing_caption"]["severity"] == "error" and by_code["missing_caption"]["fix"]
    assert "tag_frequency" in out["summary"] and by_code["tag_frequency"]["data"]["tags"]
    assert tree_digest(bad_images) == before


def test_cli_plain_report(bad_images: Path, bad_text: Path) -> None:
    result = runner.invoke(app, ["check", str(bad_images), "--trigger-word", "mychar"], env={"NO_COLOR": "1"})
    assert result.exit_code == 1
    assert "\x1b[" not in result.stdout
    assert "ERROR corrupt_image (1)" in result.stdout
    assert "metadata.csv:3" in result.stdout and "fix:" in result.stdout
    assert "steps per epoch: 243" in result.stdout
    text = runner.invoke(app, ["check", str(bad_text)])
    assert text.exit_code == 1 and "train.jsonl:3" in text.stdout


def test_cli_exit_0_on_clean_datasets(tmp_path: Path) -> None:
    images = build_good_image_dataset(tmp_path / "imgs")
    result = runner.invoke(app, ["check", str(images), "--trigger-word", "mychar"])
    assert result.exit_code == 0, result.stdout
    assert "Ready to train" in result.stdout
    jsonl = build_good_text_dataset(tmp_path / "t.jsonl")
    result = runner.invoke(app, ["check", str(jsonl), "--json"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["summary"]["records"] == 3


def test_cli_exit_2_when_unusable(tmp_path: Path) -> None:
    assert runner.invoke(app, ["check", str(tmp_path / "missing")]).exit_code == 2
    (tmp_path / "empty").mkdir()
    assert runner.invoke(app, ["check", str(tmp_path / "empty")]).exit_code == 2
    write_text(tmp_path / "docs" / "README.md", "not a dataset")
    result = runner.invoke(app, ["check", str(tmp_path / "docs"), "--json"])
    assert result.exit_code == 2 and json.loads(result.stdout)["findings"][0]["code"] == "not_a_dataset"
    write_text(tmp_path / "caps" / "a.txt", "caption without image")
    assert runner.invoke(app, ["check", str(tmp_path / "caps"), "--task", "image"]).exit_code == 2
    write_text(tmp_path / "e.jsonl", "")
    assert runner.invoke(app, ["check", str(tmp_path / "e.jsonl")]).exit_code == 2
    save(pattern((64, 64)), tmp_path / "one.png")
    assert runner.invoke(app, ["check", str(tmp_path / "one.png")]).exit_code == 2
    assert runner.invoke(app, ["check", str(tmp_path), "--task", "sound"]).exit_code == 2


def test_check_help_stays_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from typer.testing import CliRunner; from loratui.cli.app import app; "
        "r = CliRunner().invoke(app, ['check', '--help']); assert r.exit_code == 0, r.output; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'peft', 'textual') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_format_details(tmp_path: Path) -> None:
    root = tmp_path / "12_char"
    save(pattern(seed=1), root / "png_named.jpg", format="PNG")
    write_text(root / "png_named.txt", "x")
    good = save(pattern(seed=2), root / "trailer.png")
    good.write_bytes(good.read_bytes() + b"extra bytes after IEND")
    write_text(root / "trailer.txt", "x")
    write_text(root / "scan.tif", b"II*\x00")
    before = tree_digest(root)
    r = run_checks(root, resolution=256)
    assert tree_digest(root) == before
    assert paths(r, "extension_mismatch") == {"png_named.jpg"}
    assert paths(r, "trailing_data") == {"trailer.png"}
    assert paths(r, "unsupported_image_format") == {"scan.tif"}
    assert paths(r, "root_is_kohya_folder") == {"12_char/"}
    assert r.exit_code == 0 and r.summary["images_x_repeats"] == 2
