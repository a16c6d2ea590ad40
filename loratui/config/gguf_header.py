"""Read a GGUF file's header (metadata and tensor table) without reading any tensor data.

The memory planner sizes a GGUF base from it: `llm_config_from_gguf` turns the llama.cpp metadata
(`{arch}.block_count`, `{arch}.embedding_length`, ...) into the transformers `config.json` keys that loading the
file through transformers produces, so a 32B GGUF is planned as a 32B model. Array values (the tokenizer's
vocabulary) are skipped, only their length is kept. Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

_SCALARS = {  # GGUF value type -> struct format
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
MAX_KEYS = 1_000_000
MAX_DIMS = 8


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # as stored: innermost dimension first
    type_id: int

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # arrays are replaced by ("array", item type, length)
    tensors: list[GGUFTensor] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    @property
    def params(self) -> int:
        return sum(t.elements for t in self.tensors)

    def quant_types(self) -> dict[str, int]:
        """Storage type name -> parameters stored in it (e.g. {"Q4_K": ..., "F32": ...})."""
        names = _type_names()
        found: dict[str, int] = {}
        for tensor in self.tensors:
            name = names.get(tensor.type_id, f"type {tensor.type_id}")
            found[name] = found.get(name, 0) + tensor.elements
        return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def _type_names() -> dict[int, str]:
    try:
        from gguf import GGMLQuantizationType
    except ImportError:
        return {0: "F32", 1: "F16", 2: "Q4_0", 8: "Q8_0", 12: "Q4_K", 14: "Q6_K", 30: "BF16"}
    return {member.value: member.name for member in GGMLQuantizationType}


def _read(handle: BinaryIO, fmt: str) -> Any:
    size = struct.calcsize(fmt)
    raw = handle.read(size)
    if len(raw) < size:
        raise ValueError("truncated GGUF header")
    return struct.unpack(fmt, raw)[0]


def _string(handle: BinaryIO) -> str:
    length = _read(handle, "<Q")
    if length > 1 << 24:
        raise ValueError("implausible string length in GGUF header")
    raw = handle.read(length)
    if len(raw) < length:
        raise ValueError("truncated GGUF header")
    return raw.decode("utf-8", errors="replace")


def _value(handle: BinaryIO, kind: int) -> Any:
    if kind in _SCALARS:
        return _read(handle, _SCALARS[kind])
    if kind == _STRING:
        return _string(handle)
    if kind == _ARRAY:
        item, length = _read(handle, "<I"), _read(handle, "<Q")
        if item in _SCALARS:
            handle.seek(struct.calcsize(_SCALARS[item]) * length, 1)
        else:
            for _ in range(length):
                _value(handle, item)
        return ("array", item, length)
    raise ValueError(f"unknown GGUF value type {kind}")


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file. Raises ValueError for a file that is not GGUF."""
    stat = Path(path).stat()
    return _cached_header(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _cached_header(path: str, _mtime: int, _size: int) -> GGUFHeader:
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = _read(handle, "<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is too old to read (needs 2 or later)")
        tensor_count, kv_count = _read(handle, "<Q"), _read(handle, "<Q")
        if kv_count > MAX_KEYS or tensor_count > MAX_KEYS:
            raise ValueError("implausible GGUF header counts")
        metadata = {}
        for _ in range(kv_count):
            key = _string(handle)
            metadata[key] = _value(handle, _read(handle, "<I"))
        tensors = []
        for _ in range(tensor_count):
            name = _string(handle)
            dims = _read(handle, "<I")
            if dims > MAX_DIMS:
                raise ValueError("implausible tensor rank in GGUF header")
            shape = tuple(_read(handle, "<Q") for _ in range(dims))
            type_id = _read(handle, "<I")
            _read(handle, "<Q")  # data offset
            tensors.append(GGUFTensor(name, shape, type_id))
    return GGUFHeader(version, metadata, tensors)


#: GGUF `general.architecture` -> transformers model_type (the families transformers loads from GGUF)
GGUF_MODEL_TYPES = {
    "llama": "llama",
    "mistral": "mistral",
    "qwen2": "qwen2",
    "qwen2moe": "qwen2_moe",
    "qwen3": "qwen3",
    "qwen3moe": "qwen3_moe",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi3": "phi3",
}
#: GGUF metadata key (after `{arch}.`) -> config.json key
_GGUF_KEYS = {
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "context_length": "max_position_embeddings",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.sliding_window": "sliding_window",
    "expert_count": "num_experts",
    "expert_used_count": "num_experts_per_tok",
    "expert_feed_forward_length": "moe_intermediate_size",
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "vocab_size": "vocab_size",
}


def _vocab(header: GGUFHeader, hidden: int | None) -> int | None:
    tokens = header.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, tuple) and tokens[0] == "array":
        return int(tokens[2])
    for tensor in header.tensors:
        if tensor.name == "token_embd.weight" and hidden:
            return tensor.elements // hidden
    return None


def llm_config_from_gguf(header: GGUFHeader) -> dict[str, Any]:
    """The `config.json` keys of the model stored in a GGUF file (as transformers builds it on loading).

    An architecture not listed in `GGUF_MODEL_TYPES` gets the model_type `gguf-{arch}`, which nothing builds: the
    planner falls back to its analytic estimate, sized from the tensor table."""
    arch = header.architecture
    config: dict[str, Any] = {"model_type": GGUF_MODEL_TYPES.get(arch, f"gguf-{arch}")}
    for suffix, key in _GGUF_KEYS.items():
        value = header.metadata.get(f"{arch}.{suffix}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            config[key] = value
    if "vocab_size" not in config:
        vocab = _vocab(header, config.get("hidden_size"))
        if vocab:
            config["vocab_size"] = vocab
    names = {t.name for t in header.tensors}
    if names:  # llama.cpp writes no output.weight when the head shares the embedding
        config["tie_word_embeddings"] = "output.weight" not in names
    if any(".attn_q.bias" in n for n in names) and arch in ("llama", "mistral"):
        config["attention_bias"] = True
    if arch == "qwen3moe" and "intermediate_size" not in config and "moe_intermediate_size" in config:
        config["intermediate_size"] = config["moe_intermediate_size"]
    if arch.startswith("gemma"):
        config["hidden_activation"] = "gelu_pytorch_tanh"
        if arch == "gemma3":
            config.setdefault("query_pre_attn_scalar", config.get("head_dim", 256))
    return config


def describe_gguf(header: GGUFHeader) -> str:
    """One line: parameters and storage types of the file's tensors."""
    params = header.params
    if not header.tensors:
        return "the file lists no tensors"
    size = f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M"
    types = header.quant_types()
    stored = ", ".join(f"{name} {count / max(params, 1):.0%}" for name, count in list(types.items())[:3])
    return f"{size} parameters in its tensors (stored as {stored or 'nothing'})"
