"""`loratui caption` / auto_label with the tiny random BLIP model: outputs, merging, never clobbering."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from data_fixtures import pattern, save, tree_digest, write_text
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.data.caption_text import apply_edits, caption_to_tags, parse_replacements
from loratui.data.image_dataset import scan_image_dataset

runner = CliRunner()
FAST = ["--max-new-tokens", "6", "--device", "cpu"]


def make_images(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        save(pattern((64, 64), seed=50 + i), root / name)
    return root


def invoke(*args: str) -> object:
    result = runner.invoke(app, ["caption", *args])
    return result


def test_csv_output_is_loadable_and_keeps_sidecars(tmp_path: Path, tiny_blip: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png", "b.jpg", "5_sub/c.png"])
    write_text(root / "a.txt", "keep me")
    before = (root / "a.txt").read_bytes()
    result = invoke(str(root), "--model", str(tiny_blip), "--prefix", "mychar, ", "--batch-size", "2", *FAST)
    assert result.exit_code == 0, result.output
    assert (root / "a.txt").read_bytes() == before
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["filename", "prompt"]
    assert sorted(r[0] for r in rows[1:]) == ["5_sub/c.png", "b.jpg"]
    scan = scan_image_dataset(root)
    by = {i.rel: i for i in scan.items}
    assert by["a.png"].caption == "keep me" and by["a.png"].caption_source == ".txt"
    for rel in ("b.jpg", "5_sub/c.png"):
        assert by[rel].caption_source == "metadata.csv" and by[rel].caption.startswith("mychar,")
    assert not scan.has_errors, [f.code for f in scan.findings]
    assert not list(root.rglob(".*.tmp"))  # no temporary files left behind


def test_merge_keeps_existing_rows_and_header(tmp_path: Path, tiny_blip: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png", "b.png", "c.png"])
    write_text(root / "metadata.csv", 'file_name,text\na.png,"existing, caption ""quoted"""\n')
    result = invoke(str(root), "--model", str(tiny_blip), *FAST)
    assert result.exit_code == 0, result.output
    with open(root / "metadata.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["file_name", "text"]
    assert rows[1] == ["a.png", 'existing, caption "quoted"']
    assert [r[0] for r in rows[2:]] == ["b.png", "c.png"]
    snapshot = tree_digest(root)
    again = invoke(str(root), "--model", str(tiny_blip), *FAST)
    assert again.exit_code == 0 and "Nothing to caption" in again.output
    assert tree_digest(root) == snapshot
    redo = invoke(str(root), "--model", str(tiny_blip), "--overwrite", "--prefix", "hero, ", *FAST)
    assert redo.exit_code == 0, redo.output
    table = scan_image_dataset(root)
    assert all(i.caption.startswith("hero,") for i in table.items)


def test_broken_metadata_is_refused_not_rewritten(tmp_path: Path, tiny_blip: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png", "b.png"])
    write_text(root / "metadata.csv", 'filename,prompt\na.png,"bad "quote\n')
    snapshot = tree_digest(root)
    result = invoke(str(root), "--model", str(tiny_blip), *FAST)
    assert result.exit_code == 2
    assert "metadata.csv:2" in result.output and "not rewritten" in result.output
    assert tree_digest(root) == snapshot


def test_txt_sidecars_skip_existing_tags_and_edits(tmp_path: Path, tiny_blip: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png", "b.png", "c.webp"])
    write_text(root / "a.txt", "existing caption")
    result = invoke(
        str(root), "--model", str(tiny_blip), "--format", "txt", "--style", "tags",
        "--prefix", "mychar, ", "--append", "masterpiece", *FAST,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (root / "a.txt").read_text() == "existing caption"
    assert not (root / "metadata.csv").exists()
    for name in ("b.txt", "c.txt"):
        text = (root / name).read_text(encoding="utf-8").strip()
        assert text.startswith("mychar, ") and text.endswith(", masterpiece")
        tags = [t.strip() for t in text.split(",")]
        assert all(t and len(t.split()) <= 3 for t in tags), tags
        assert not {"a", "the", "of", "with"} & {w for t in tags for w in t.split()}
    snapshot = tree_digest(root)
    again = invoke(str(root), "--model", str(tiny_blip), "--format", "txt", *FAST)
    assert again.exit_code == 0 and tree_digest(root) == snapshot


def test_unreadable_image_is_reported_others_written(tmp_path: Path, tiny_blip: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png"])
    write_text(root / "broken.png", b"not an image")
    result = invoke(str(root), "--model", str(tiny_blip), *FAST)
    assert result.exit_code == 1
    assert "broken.png" in result.output
    assert [i.rel for i in scan_image_dataset(root).items if i.caption_source == "metadata.csv"] == ["a.png"]


def test_auto_label_seed_command_shape(
    tmp_path: Path, tiny_blip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loratui.tools.auto_label import main

    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "data" / "style_train", ["x.png", "y.jpg"])
    argv = [
        "--input",
        "data/style_train",
        "--output",
        "data/style_train/metadata.csv",
        "--model",
        str(tiny_blip),
    ]
    assert main([*argv, "--max-new-tokens", "6", "--device", "cpu"]) == 0
    scan = scan_image_dataset(Path("data/style_train"))
    assert {i.rel: i.caption_source for i in scan.items} == {"x.png": "metadata.csv", "y.jpg": "metadata.csv"}


def test_missing_model_explains_how_to_fetch(tmp_path: Path) -> None:
    root = make_images(tmp_path / "ds", ["a.png"])
    result = invoke(str(root), "--model", "blip-large")
    assert result.exit_code == 2
    assert "hf download Salesforce/blip-image-captioning-large" in result.output
    assert not (root / "metadata.csv").exists()
    assert invoke(str(tmp_path / "nope")).exit_code == 2
    assert invoke(str(root), "--format", "txt", "--output", str(root / "m.csv")).exit_code == 2


def test_local_tagger_model(tmp_path: Path) -> None:
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    labels = ["long_hair", "smile", "outdoors"]
    config = ViTConfig(
        image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=37, num_labels=3, id2label=dict(enumerate(labels)),
        label2id={k: i for i, k in enumerate(labels)}, problem_type="multi_label_classification",
    )  # fmt: skip
    torch.manual_seed(0)
    model_dir = tmp_path / "tagger"
    ViTForImageClassification(config).save_pretrained(model_dir)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(model_dir)
    root = make_images(tmp_path / "ds", ["a.png", "b.png"])
    result = invoke(str(root), "--model", str(model_dir), "--format", "txt", "--device", "cpu")
    assert result.exit_code == 0, result.output
    for name in ("a.txt", "b.txt"):
        text = (root / name).read_text().strip()
        assert set(filter(None, (t.strip() for t in text.split(",")))) <= {"long hair", "smile", "outdoors"}


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU")
def test_blip_uses_fp16_on_gpu(tiny_blip: Path) -> None:
    import torch

    from loratui.data.caption_models import load_captioner

    cap = load_captioner(tiny_blip, "cuda", max_new_tokens=4)
    assert next(cap.model.parameters()).dtype == torch.float16
    assert len(cap.caption([pattern((64, 64))])) == 1


# --- caption text rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("caption", "tags"),
    [
        ("a woman sitting on a bench with a dog in the park", "woman, sitting, bench, dog, park"),
        (
            "arafed man in a suit and tie standing in front of a building",
            "man, suit, tie, standing, front, building",
        ),
        ("there is a red car parked on the street", "red car, parked, street"),
        ("a close up of a cat with long black hair", "close up, cat, long black hair"),
        ("a painting of a castle on a hill at sunset", "painting, castle, hill, sunset"),
        ("a photo of a cat and a cat", "cat"),
    ],
)
def test_caption_to_tags(caption: str, tags: str) -> None:
    assert caption_to_tags(caption) == tags


def test_edits_order_and_rules() -> None:
    pairs = parse_replacements(["a man=mychar", "suit=red suit"])
    assert apply_edits("a man in a suit", prefix="photo, ", replacements=pairs, append="masterpiece") == (
        "photo, mychar in a red suit, masterpiece"
    )
    assert apply_edits("mychar, smiling", prefix="mychar, ") == "mychar, smiling"
    assert apply_edits("x", append=", y") == "x, y"
    with pytest.raises(ValueError, match="OLD=NEW"):
        parse_replacements(["nothing"])


def test_caption_help_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from typer.testing import CliRunner; from loratui.cli.app import app; "
        "r = CliRunner().invoke(app, ['caption', '--help']); assert r.exit_code == 0; "
        "import loratui.tools.auto_label; "
        "print(json.dumps([m for m in ('torch', 'transformers', 'diffusers', 'peft', 'textual') if m in sys.modules]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", "import json; " + code], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == []
