"""Ollama `Modelfile` for a merged GGUF model: `FROM`, the chat format as an Ollama (Go) `TEMPLATE`, and stops.

Ollama templates are Go templates, Hugging Face chat templates Jinja; there is no general translation. The
model's Jinja template is recognised by the markers of the common chat formats (Llama 2 `[INST] <<SYS>>`,
Mistral `[INST]`, Llama 3 header ids, ChatML, Gemma turns, Phi-3 tags) and written as that format's Go template.
An unrecognised template is not guessed: the Modelfile then has no TEMPLATE and says so (Ollama falls back to the
`tokenizer.chat_template` stored in the GGUF file).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChatFormat:
    name: str
    markers: tuple[str, ...]  # all must occur in the Jinja template
    template: str  # Ollama Go template
    stops: tuple[str, ...]


LLAMA2 = ChatFormat(
    "llama2-chat",
    ("[INST]", "<<SYS>>"),
    """{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}[INST] {{ if and (eq $i 0) $.System }}<<SYS>>
{{ $.System }}
<</SYS>>

{{ end }}{{ $m.Content }} [/INST]
{{- else if eq $m.Role "assistant" }} {{ $m.Content }} </s><s>
{{- end }}
{{- end }}""",
    ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "</s>"),
)
MISTRAL = ChatFormat(
    "mistral-instruct",
    ("[INST]",),
    """{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}[INST] {{ if and $.System (eq $i 0) }}{{ $.System }}

{{ end }}{{ $m.Content }}[/INST]
{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>
{{- end }}
{{- end }}""",
    ("[INST]", "[/INST]", "</s>"),
)
LLAMA3 = ChatFormat(
    "llama3-instruct",
    ("<|start_header_id|>", "<|eot_id|>"),
    """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

""",
    ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
)
CHATML = ChatFormat(
    "chatml",
    ("<|im_start|>", "<|im_end|>"),
    """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
""",
    ("<|im_start|>", "<|im_end|>"),
)
GEMMA = ChatFormat(
    "gemma-instruct",
    ("<start_of_turn>", "<end_of_turn>"),
    """{{- range $i, $m := .Messages }}<start_of_turn>
{{- if eq $m.Role "user" }}user
{{- if and $.System (eq $i 0) }}
{{ $.System }}
{{- end }}
{{- else }}model
{{- end }}
{{ $m.Content }}<end_of_turn>
{{ end }}<start_of_turn>model
""",
    ("<start_of_turn>", "<end_of_turn>"),
)
PHI3 = ChatFormat(
    "phi-3",
    ("<|user|>", "<|end|>", "<|assistant|>"),
    """{{- if .System }}<|system|>
{{ .System }}<|end|>
{{ end }}
{{- range .Messages }}<|{{ .Role }}|>
{{ .Content }}<|end|>
{{ end }}<|assistant|>
""",
    ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"),
)
# most specific first: Llama 2's markers include Mistral's
FORMATS = (LLAMA3, CHATML, GEMMA, PHI3, LLAMA2, MISTRAL)


def chat_format(jinja_template: str | None) -> ChatFormat | None:
    """The known chat format a Jinja chat template renders, or None."""
    if not jinja_template:
        return None
    for fmt in FORMATS:
        if all(marker in jinja_template for marker in fmt.markers):
            return fmt
    return None


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, jinja_template: str | None, eos_token: str | None = None) -> str:
    """A Modelfile for `./gguf_name` (in the same folder)."""
    fmt = chat_format(jinja_template)
    lines = [f"FROM ./{gguf_name}", ""]
    if fmt is None:
        lines.append("# The model's chat template is not one of the known formats; Ollama reads")
        lines.append(
            "# tokenizer.chat_template from the GGUF file. Add a TEMPLATE here to set it explicitly."
        )
        stops = [eos_token] if eos_token else []
    else:
        lines.append(f"# chat format: {fmt.name} (recognised in the model's chat template)")
        lines.append(f'TEMPLATE """{fmt.template}"""')
        stops = list(fmt.stops)
        if eos_token and eos_token not in stops:
            stops.append(eos_token)
    lines.append("")
    lines += [f"PARAMETER stop {_quoted(stop)}" for stop in stops]
    return "\n".join(lines).rstrip("\n") + "\n"
