"""An LLM export source (an adapter's tensors and settings from a run, checkpoint or adapter folder) and the
base + adapter merge that the merged-model exports (Hugging Face folder, GGUF) share."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.models.llm.adapter_files import ExportError, write_adapter


@dataclass
class ExportSource:
    """An adapter's tensors and settings, from wherever they were found."""

    path: Path
    kind: str  # run | checkpoint | adapter
    tensors: dict[str, Any]
    adapter_config: dict[str, Any]
    chat_template: str | None
    run_name: str | None
    step: int | None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def base_model(self) -> str:
        return str(self.adapter_config.get("base_model_name_or_path") or "")

    def default_out(self, merge: bool, dtype: str | None) -> Path:
        suffix = f"merged-{dtype or 'bf16'}" if merge else ("adapter" + (f"-{dtype}" if dtype else ""))
        if self.kind == "run":
            return self.path / "exports" / suffix
        if self.kind == "checkpoint":
            run = self.path.parent.parent if self.path.parent.name == "checkpoints" else self.path.parent
            return run / "exports" / f"{self.path.name}-{suffix}"
        return self.path.with_name(f"{self.path.name}-{suffix}")


def merged_model(src: ExportSource) -> tuple[Any, Any, Any]:
    """(base + adapter merged by PEFT, the base tokenizer, the base's `BaseSource`)."""
    from peft import PeftModel

    from loratui.models.llm.loading import load_base

    if not src.base_model:
        raise ExportError("the adapter does not name its base model (base_model_name_or_path); cannot merge")
    model, tokenizer, base = load_base(
        src.base_model, allow_pickle=src.allow_pickle, trust_remote_code=src.trust_remote_code
    )
    with tempfile.TemporaryDirectory(prefix="loratui-adapter-") as tmp_adapter:
        config = dict(src.adapter_config)
        write_adapter(Path(tmp_adapter) / "a", tensors=src.tensors, adapter_config=config, chat_template=None)
        peft_model = PeftModel.from_pretrained(model, str(Path(tmp_adapter) / "a"))
        return peft_model.merge_and_unload(), tokenizer, base
