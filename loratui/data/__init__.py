"""Dataset parsing, checks and captioning.

Parsing (used by ``loratui check`` and by the trainers, so both read datasets the same way):

- ``loratui.data.image_dataset.scan_image_dataset``: images, captions, kohya repeats.
- ``loratui.data.text_dataset.read_text_dataset``: JSON/JSONL records normalised to chat messages or text.
- ``loratui.data.image_io.open_image_rgb`` / ``probe_image``: reading images as training does.
- ``loratui.data.findings``: ``Finding``, ``Example``, ``Report``; codes in ``loratui.data.codes``.

Checks: ``loratui.data.check.run_checks`` (pure); rendering: ``loratui.data.report_render``.
Captioning: ``loratui.data.captioning``.
"""
