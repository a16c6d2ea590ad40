"""Chat formatting and loss masks for LLM training records.

A record's messages are rendered with the chat template (the config's `chat_template`, else the tokenizer's,
else `PLAIN_CHAT_TEMPLATE` below), tokenized once with character offsets, and each token is a target when it
starts inside an assistant turn. The same template is saved with the adapter (`chat_template.jinja`) and used
by `loratui sample`, so inference formats prompts exactly as training did.

Plain template (models without a chat template)::

    <bos>{system}\n\n### User:\n{user}\n\n### Assistant:\n{assistant}<eos>\n\n### User:\n...

Rules: the first token of a sample is never a target (it has no context, and in a packed row it must not be
predicted from the previous sample); an EOS token is appended when the rendered text does not already end the
last answer with one; `train_on_prompt` makes every token after the first a target. `text` records (raw text)
are all targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.data.text_dataset import TextRecord

IGNORE_INDEX = -100

PLAIN_CHAT_TEMPLATE = (
    "{%- if bos_token %}{{ bos_token }}{% endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n\\n' }}"
    "{%- elif message['role'] == 'user' -%}"
    "{%- if not loop.first and messages[loop.index0 - 1]['role'] == 'assistant' %}{{ '\\n\\n' }}{% endif -%}"
    "{{ '### User:\\n' + message['content'] + '\\n\\n### Assistant:\\n' }}"
    "{%- else -%}{{ message['content'] + (eos_token or '') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


class TemplateProblem(ValueError):
    """A record the chat template cannot render (e.g. roles that do not alternate)."""


@dataclass
class Encoded:
    """One tokenized training sample."""

    input_ids: list[int]
    labels: list[int]

    @property
    def num_targets(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def choose_template(tokenizer: Any, configured: str | None) -> tuple[str, str]:
    """(template, origin): the config's template (text, or a .jinja file), the tokenizer's (its default one when it has several), or
    the plain one."""
    if configured:
        path = Path(configured).expanduser()
        if len(configured) < 4096 and path.suffix in (".jinja", ".j2") and path.is_file():
            return path.read_text(encoding="utf-8"), f"config ({path})"
        return configured, "config"
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default") or next(iter(own.values()), None)
    if isinstance(own, str) and own.strip():
        return own, "tokenizer"
    return PLAIN_CHAT_TEMPLATE, "plain"


def _as_dicts(messages: list[Any]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} if not isinstance(m, dict) else m for m in messages]


def render(tokenizer: Any, template: str, messages: list[Any], *, generation_prompt: bool = False) -> str:
    """The conversation as text. A template that rejects system messages gets them merged into the first
    user turn. Raises `TemplateProblem`."""
    msgs = _as_dicts(messages)
    try:
        return tokenizer.apply_chat_template(
            msgs, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
        )
    except Exception as exc:  # jinja TemplateError, raise_exception(...) in templates, ...
        if msgs and msgs[0]["role"] == "system" and len(msgs) > 1 and msgs[1]["role"] == "user":
            merged = [
                {"role": "user", "content": msgs[0]["content"] + "\n\n" + msgs[1]["content"]},
                *msgs[2:],
            ]
            try:
                return tokenizer.apply_chat_template(
                    merged, chat_template=template, tokenize=False, add_generation_prompt=generation_prompt
                )
            except Exception:
                pass
        raise TemplateProblem(f"the chat template cannot render this record: {exc}") from exc


def _assistant_spans(tokenizer: Any, template: str, messages: list[Any], full: str) -> list[tuple[int, int]]:
    """Character spans of the assistant turns in `full` (each from its first character through its end
    marker), found by rendering the conversation up to each turn."""
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = render(tokenizer, template, messages[:i], generation_prompt=True) if i else ""
        through = render(tokenizer, template, messages[: i + 1])
        if not (full.startswith(through) and through.startswith(before)):
            return _spans_by_search(tokenizer, messages, full)
        spans.append((len(before), len(through)))
    return spans


#: markers that end an assistant turn in the families' chat templates (Phi-3, ChatML, Gemma, Llama 3)
END_OF_TURN = ("<|end|>", "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>")


def _spans_by_search(tokenizer: Any, messages: list[Any], full: str) -> list[tuple[int, int]]:
    """Fallback for templates that rewrite earlier turns: find each answer's text plus the end-of-turn marker
    and eos that directly follow it (whitespace between them allowed)."""
    spans, cursor = [], 0
    markers = tuple(m for m in (*END_OF_TURN, tokenizer.eos_token) if m)
    for message in messages:
        content = message.content.strip()
        if message.role != "assistant" or not content:
            continue
        start = full.find(content, cursor)
        if start < 0:
            raise TemplateProblem("cannot locate an assistant answer in the rendered chat")
        end = start + len(content)
        while True:
            rest = full[end:]
            gap = len(rest) - len(rest.lstrip())
            marker = next((m for m in markers if rest[gap:].startswith(m)), None)
            if marker is None:
                break
            end += gap + len(marker)
        spans.append((start, end))
        cursor = end
    return spans


def _tokenize_with_offsets(
    tokenizer: Any, text: str, special: bool
) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=special, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def encode_record(record: TextRecord, tokenizer: Any, template: str, *, train_on_prompt: bool) -> Encoded:
    """Tokens and labels of one record (not truncated). Raises `TemplateProblem`."""
    eos_id = tokenizer.eos_token_id
    if record.messages is None:
        ids, _ = _tokenize_with_offsets(tokenizer, record.text or "", True)
        labels = list(ids)
    else:
        full = render(tokenizer, template, record.messages)
        ids, offsets = _tokenize_with_offsets(tokenizer, full, False)
        if train_on_prompt:
            labels = list(ids)
        else:
            spans = _assistant_spans(tokenizer, template, record.messages, full)
            labels = [
                tok if end > start and any(a <= start < b for a, b in spans) else IGNORE_INDEX
                for tok, (start, end) in zip(ids, offsets, strict=True)
            ]
    if eos_id is not None and (not ids or ids[-1] != eos_id) and not _ends_with_eos(ids, labels, eos_id):
        ids.append(eos_id)
        labels.append(eos_id)
    if labels:
        labels[0] = IGNORE_INDEX
    return Encoded(ids, labels)


def _ends_with_eos(ids: list[int], labels: list[int], eos_id: int) -> bool:
    """True when the last target run already contains eos (templates that close turns with eos + newline)."""
    last_targets = [tok for tok, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX][-3:]
    return eos_id in last_targets


def prompt_ids(tokenizer: Any, template: str, messages: list[Any]) -> list[int]:
    """Token ids of a prompt ready for generation (the same template and tokenization as training)."""
    text = render(tokenizer, template, messages, generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
