"""The catalogue of finding codes: stable ids with their default severity, message and fix.

Codes are part of the public API (``--json`` output, tests, trainers refusing to start). Add new codes,
never rename existing ones. ``docs/datasets.md`` explains each of them for users.
"""

from __future__ import annotations

from typing import Literal

Severity = Literal["error", "warning", "info"]

# code: (severity, message, fix)
CODES: dict[str, tuple[Severity, str, str]] = {
    # --- input --------------------------------------------------------------------------------
    "path_not_found": (
        "error",
        "The dataset path does not exist.",
        "Check the path (and the current folder).",
    ),
    "not_a_dataset": (
        "error",
        "No images or JSON/JSONL files were found here.",
        "Point at a folder of images (with captions) or at a .jsonl/.json file or folder of them.",
    ),
    "file_unreadable": (
        "error",
        "Dataset files that cannot be read (no permission, or an I/O error); they are not used.",
        "Make them readable by this user (e.g. `chmod a+r FILE`) or move them out of the dataset.",
    ),
    "tokenizer_unavailable": (
        "info",
        "No tokenizer was loaded; token counts are an approximation.",
        "Pass --config with base_model set to a local model folder to count with the real tokenizer.",
    ),
    # --- image dataset layout and captions ---------------------------------------------------
    "no_images": (
        "error",
        "No supported images (png, jpg, jpeg, webp, bmp, gif) were found.",
        "Put the training images in this folder (or in kohya-style N_name subfolders).",
    ),
    "unsupported_image_format": (
        "warning",
        "Image files in a format loratui does not train on are ignored.",
        "Convert them to PNG or JPEG (e.g. `mogrify -format png *.tif`) or remove them.",
    ),
    "missing_caption": (
        "error",
        "Images without a caption (no metadata.csv row and no sidecar caption file); they would be "
        "trained with an empty caption.",
        "Caption them (`loratui caption PATH`), or add <image>.txt files or metadata.csv rows.",
    ),
    "wrong_caption_extension": (
        "error",
        "Captions exist, but with a file extension that is not read, so these images count as uncaptioned "
        "(the kohya 'No caption file found' mix-up).",
        "Rename the caption files to the expected extension or set caption_extension in the config.",
    ),
    "orphan_caption": (
        "warning",
        "Caption files without a matching image.",
        "Add the image or delete the caption; names must match (cat.png <-> cat.txt).",
    ),
    "empty_caption": (
        "warning",
        "Empty captions; these images train on an empty prompt.",
        "Write a caption, or delete the empty files and run `loratui caption PATH` (it never overwrites).",
    ),
    "multiline_caption": (
        "warning",
        "Caption files with more than one non-empty line; only the first line is used (as kohya does).",
        "Put the whole caption on one line (tags separated by commas).",
    ),
    "caption_not_utf8": (
        "error",
        "Caption files that are not valid UTF-8; undecodable bytes would be replaced.",
        "Re-save the file as UTF-8 (e.g. `iconv -f cp1252 -t utf-8 in.txt > out.txt`).",
    ),
    "caption_conflict": (
        "warning",
        "Images captioned both in metadata.csv and by a sidecar file; the metadata.csv row wins.",
        "Keep one caption source: delete the sidecar files or the metadata.csv rows.",
    ),
    "duplicate_caption_files": (
        "warning",
        "Images with several sidecar caption files; the first configured extension wins.",
        "Keep one caption file per image.",
    ),
    "kohya_folders": ("info", "kohya-style folders (N_name: N repeats per epoch).", ""),
    "malformed_kohya_folder": (
        "warning",
        "Folder names that do not follow the kohya N_name pattern (e.g. 10_mychar); loratui uses 1 repeat "
        "for them, kohya would skip them.",
        "Rename the folder to <repeats>_<name> with repeats >= 1, e.g. 10_mychar.",
    ),
    "root_is_kohya_folder": (
        "info",
        "The dataset folder itself is named like a kohya N_name folder; repeats are only read from its "
        "subfolders, so these images use 1 repeat.",
        "Point at the parent folder to use the repeat count from the folder name.",
    ),
    "metadata_not_utf8": (
        "error",
        "metadata.csv is not valid UTF-8.",
        "Re-save metadata.csv as UTF-8.",
    ),
    "metadata_bad_columns": (
        "error",
        "metadata.csv has an unknown header; expected `filename,prompt` (or `file_name,text`).",
        "Make the first line `filename,prompt`.",
    ),
    "metadata_extra_columns": (
        "warning",
        "metadata.csv has columns besides the file name and caption; they are ignored.",
        "Remove the extra columns if they were meant to be part of the caption (quote captions with commas).",
    ),
    "metadata_bad_quoting": (
        "error",
        "metadata.csv rows with broken quoting; these rows are skipped.",
        'Quote fields that contain commas or quotes: "a cat, sitting" and double inner quotes ("").',
    ),
    "metadata_wrong_column_count": (
        "error",
        "metadata.csv rows with the wrong number of columns (often an unquoted comma in a caption); "
        "these rows are skipped.",
        'Quote the caption: file.png,"a cat, sitting".',
    ),
    "metadata_duplicate_row": (
        "warning",
        "metadata.csv lists the same image more than once; the first row is used.",
        "Delete the repeated rows.",
    ),
    "metadata_missing_image": (
        "error",
        "metadata.csv rows whose image file does not exist (or is not a supported image).",
        "Fix the file name (relative to the dataset folder) or delete the row.",
    ),
    "metadata_empty": (
        "warning",
        "metadata.csv has no data rows.",
        "Add `filename,prompt` rows or delete the file.",
    ),
    "trigger_word_missing": (
        "warning",
        "Captions without the trigger word.",
        'Add the trigger word to these captions (e.g. `loratui caption PATH --prefix "mychar, "`).',
    ),
    # --- loss masks and regularization images ---------------------------------------------------
    "missing_mask": (
        "error",
        "Images without a mask file in mask_dir (masked_loss).",
        "Add a grayscale mask with the image's name and size to mask_dir (white: trained, black: ignored).",
    ),
    "mask_size_mismatch": (
        "error",
        "Mask files whose size differs from their image's.",
        "Re-export each mask at its image's width and height.",
    ),
    "mask_unreadable": (
        "error",
        "Mask files that cannot be read.",
        "Re-export them as PNG (grayscale) or delete them and add a new mask.",
    ),
    "no_alpha_mask": (
        "warning",
        "Images without an alpha channel while alpha_mask is on; their whole area is trained.",
        "Save these images with transparency (RGBA PNG/WebP) where the background must not count.",
    ),
    "reg_images": (
        "info",
        "Regularization images (prior preservation), balanced against the training samples as kohya does.",
        "",
    ),
    "reg_images_unused": (
        "warning",
        "Regularization images that are never used: there are more of them than training samples.",
        "Add training images or repeats, or remove regularization images you do not need.",
    ),
    # --- image files -------------------------------------------------------------------------
    "corrupt_image": (
        "error",
        "Files that cannot be read as images.",
        "Re-export or re-download these files, or delete them.",
    ),
    "truncated_image": (
        "error",
        "Truncated image files (the data ends early; usually an interrupted download or copy).",
        "Re-download or re-export these files, or delete them.",
    ),
    "decompression_bomb": (
        "error",
        "Images whose header declares more pixels than Pillow's safety limit (PIL.Image.MAX_IMAGE_PIXELS); "
        "they are refused without being decoded.",
        "Downscale them with a trusted tool or delete them (they may be malicious).",
    ),
    "tiny_image": (
        "error",
        "Images smaller than 64 px on a side; they carry no usable detail.",
        "Delete them or replace them with larger versions.",
    ),
    "image_too_small": (
        "warning",
        "Images whose shorter side is below the training resolution; they get upscaled (blurry training data).",
        "Use larger sources, upscale them carefully, or lower the training resolution.",
    ),
    "extreme_aspect_ratio": (
        "warning",
        "Images with an aspect ratio beyond 4:1; they crop or bucket badly.",
        "Crop them to a less extreme aspect ratio.",
    ),
    "exact_duplicate": (
        "warning",
        "Byte-identical image files; duplicates train as extra repeats.",
        "Delete the copies (or use folder repeats on purpose).",
    ),
    "near_duplicate": (
        "warning",
        "Images that look almost the same (perceptual hash distance <= 4 of 64 bits).",
        "Check them and delete near copies unless they are intended variations.",
    ),
    "near_duplicate_coverage": (
        "info",
        "Near-duplicate detection was limited to some images.",
        "Run with --deep to compare every image.",
    ),
    "exif_rotation": (
        "info",
        "Images with an EXIF orientation; they are rotated upright when loaded.",
        "",
    ),
    "alpha_channel": (
        "info",
        "Images with transparency; transparent areas are composited on white when loaded.",
        "Flatten them on the background you want if white is wrong.",
    ),
    "cmyk_image": (
        "info",
        "CMYK images; they are converted to RGB when loaded.",
        "Convert to RGB for exact colours.",
    ),
    "palette_image": ("info", "Palette (indexed colour) images; they are converted to RGB when loaded.", ""),
    "high_bit_depth": (
        "info",
        "16-bit or floating-point images; they are scaled down to 8 bits per channel when loaded.",
        "",
    ),
    "grayscale_image": ("info", "Grayscale images; they are converted to RGB when loaded.", ""),
    "animated_image": (
        "warning",
        "Animated images; only the first frame is used.",
        "Extract the frames you want as separate PNG files.",
    ),
    "extension_mismatch": (
        "info",
        "Files whose extension does not match their actual format.",
        "Rename them to the right extension.",
    ),
    "trailing_data": (
        "info",
        "Image files with extra data after the end-of-image marker; the image itself decodes.",
        "",
    ),
    "caption_too_long": (
        "warning",
        "Captions longer than CLIP's 77-token limit; the text encoder cuts them.",
        "Shorten these captions (put the important words first).",
    ),
    "tag_frequency": ("info", "Most frequent caption tags.", ""),
    # --- text datasets -----------------------------------------------------------------------
    "jsonl_parse_error": (
        "error",
        "JSONL lines that are not valid JSON; they are skipped.",
        "Fix the JSON on these lines (one complete object per line).",
    ),
    "json_parse_error": (
        "error",
        "A .json file that is not valid JSON; records after the error are not read.",
        "Fix the JSON at the reported line, or convert the file to JSONL.",
    ),
    "json_not_records": (
        "error",
        "A .json file that is not an array of record objects.",
        "Use a JSON array of objects, or JSONL with one object per line.",
    ),
    "text_not_utf8": (
        "error",
        "Lines that are not valid UTF-8; they are skipped.",
        "Re-save the file as UTF-8.",
    ),
    "not_an_object": (
        "error",
        "Records that are not JSON objects; they are skipped.",
        'Each line must be an object such as {"prompt": ..., "response": ...}.',
    ),
    "unknown_format": (
        "error",
        "Records in no known format (prompt/response, alpaca, chat messages, sharegpt, text); skipped.",
        "Use one of the formats listed in docs/datasets.md.",
    ),
    "missing_fields": (
        "error",
        "Records missing required fields (or with non-string values); they are skipped.",
        "Add the missing fields.",
    ),
    "bad_role": (
        "error",
        "Chat messages with an unknown role; the record is skipped.",
        "Use roles system, user and assistant (sharegpt: system, human, gpt).",
    ),
    "empty_response": (
        "error",
        "Records whose response (the last assistant message) is empty or missing; they teach nothing.",
        "Fill in the responses or delete these records.",
    ),
    "empty_text": ("error", "Records with an empty text field.", "Delete these records or fill them in."),
    "mixed_formats": (
        "warning",
        "Files mixing several record formats; each record is read in its own format.",
        "Convert the file to one format.",
    ),
    "duplicate_record": (
        "warning",
        "Identical records (after normalisation); duplicates are over-weighted in training.",
        "Delete the duplicates.",
    ),
    "detected_format": ("info", "Detected record format per file.", ""),
    "not_a_preference_record": (
        "error",
        "Records without both a `chosen` and a `rejected` answer; preference training (DPO/ORPO) skips them.",
        'Give every record a prompt with "chosen" and "rejected" answers (see docs/datasets.md), or train '
        "these records with method: sft.",
    ),
    "pair_prompt_mismatch": (
        "error",
        "Pairs whose `chosen` and `rejected` conversations do not share the prompt (the same turns up to the "
        "last user turn), or go on with user turns after the answer; they are skipped.",
        "Give both conversations the same prompt turns, or use the explicit `prompt` field.",
    ),
    "unpaired_record": (
        "error",
        "Records with one labelled completion (KTO data) in a dataset for DPO or ORPO, which need pairs; skipped.",
        "Train them with method: kto, or give every record a chosen and a rejected answer.",
    ),
    "identical_pair": (
        "warning",
        "Pairs whose chosen and rejected answers are the same; they teach no preference.",
        "Fix or delete these pairs.",
    ),
    "empty_file": ("warning", "Files without any records.", "Delete them or fill them in."),
    "token_lengths": ("info", "Token length distribution of the records.", ""),
    "exceeds_max_seq_len": (
        "warning",
        "Records longer than max_seq_len; they are truncated in training.",
        "Raise max_seq_len (memory permitting) or shorten/split these records.",
    ),
}


def describe(code: str) -> tuple[Severity, str, str]:
    """Default (severity, message, fix) for ``code``; unknown codes are warnings with no fix."""
    return CODES.get(code, ("warning", code.replace("_", " "), ""))
