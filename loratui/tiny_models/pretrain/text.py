"""``python -m loratui.tiny_models.pretrain text``: pretrain the shipped small Llama on health-advice text.

Seeded end to end: the sentences (``text_corpus``), the tokenizer (byte-level BPE learned on them and the
bundled corpus), the initial weights and the batch order. The result is a Hugging Face folder (Llama layout,
fp16 safetensors, fast tokenizer with a chat template) that loads with ``AutoModelForCausalLM`` and
``AutoTokenizer``, plus ``README.md`` (provenance, licence) and ``pretraining.json`` (figures).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loratui.tiny_models.bpe import read_corpus
from loratui.tiny_models.llama import BOS, EOS, PAD, UNK, chat_template_text, make_llama_tokenizer
from loratui.tiny_models.pretrain.text_corpus import generate_sentences

MODEL_NAME = "health-llama"
SHIPPED = Path(__file__).resolve().parents[1] / "pretrained" / MODEL_NAME
HELD_OUT_SEED_OFFSET = 1_000_003


def shipped_text_model() -> Path:
    """The folder of the shipped small Llama (``loratui/tiny_models/pretrained/health-llama``)."""
    if not (SHIPPED / "model.safetensors").is_file():
        raise FileNotFoundError(
            f"{SHIPPED} has no model.safetensors; rebuild it with `python -m loratui.tiny_models.pretrain text`"
        )
    return SHIPPED


@dataclass(frozen=True)
class TextPretrainSettings:
    """Everything that determines the pretraining run."""

    seed: int = 0
    sentences: int = 60_000
    held_out_sentences: int = 1_000
    tokenizer_sentences: int = 20_000
    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    seq_len: int = 96
    batch_size: int = 16
    steps: int = 1200
    learning_rate: float = 5e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    threads: int = 1


def model_config(settings: TextPretrainSettings, tokenizer: Any) -> Any:
    """The ``LlamaConfig`` of the shipped model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=settings.vocab_size,
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_hidden_layers,
        num_attention_heads=settings.num_attention_heads,
        num_key_value_heads=settings.num_key_value_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )


def build_tokenizer(settings: TextPretrainSettings, sentences: list[str]) -> Any:
    """A fast tokenizer (byte-level BPE, Llama specials, chat template) learned on the generated sentences."""
    from transformers import PreTrainedTokenizerFast

    corpus = sentences[: settings.tokenizer_sentences] + read_corpus("en", "zh")
    backend = make_llama_tokenizer(settings.vocab_size, pad_token=True, corpus=corpus)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = chat_template_text()
    return tokenizer


def held_out_sentences(settings: TextPretrainSettings, seen: set[str]) -> list[str]:
    """Generated sentences of the same domain that the training set does not contain."""
    fresh = generate_sentences(settings.held_out_sentences * 4, settings.seed + HELD_OUT_SEED_OFFSET)
    return [s for s in dict.fromkeys(fresh) if s not in seen][: settings.held_out_sentences]


def token_stream(tokenizer: Any, sentences: list[str]) -> list[int]:
    """``<s> sentence </s>`` for each sentence, concatenated."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for encoded in tokenizer(sentences, add_special_tokens=True)["input_ids"]:
        ids.extend(encoded + [eos])
    return ids


def perplexity(model: Any, tokenizer: Any, sentences: list[str], batch_size: int = 64) -> float:
    """Per-token perplexity of ``sentences`` (each scored on its own, ``<s>`` given, ``</s>`` predicted)."""
    import torch

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for start in range(0, len(sentences), batch_size):
            rows = [ids + [eos] for ids in tokenizer(sentences[start : start + batch_size])["input_ids"]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), reduction="sum"
            )
            total += loss.item()
            count += int((labels != -100).sum())
    return math.exp(total / count)


def train(settings: TextPretrainSettings, model: Any, stream: list[int], log: Any = print) -> list[float]:
    """AdamW with warm-up and cosine decay on random windows of the token stream; returns the losses."""
    import torch

    data = torch.tensor(stream, dtype=torch.long)
    generator = torch.Generator().manual_seed(settings.seed)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay, betas=(0.9, 0.95)
    )

    def lr_factor(step: int) -> float:
        if step < settings.warmup_steps:
            return (step + 1) / settings.warmup_steps
        progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses: list[float] = []
    span = settings.seq_len
    started = time.perf_counter()
    for step in range(settings.steps):
        starts = torch.randint(0, len(data) - span, (settings.batch_size,), generator=generator)
        batch = torch.stack([data[s : s + span] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts the labels
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 50 == 0 or step == settings.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            log(f"step {step + 1}/{settings.steps}  loss {recent:.3f}  {time.perf_counter() - started:.0f} s")
    model.eval()
    return losses


def cpu_seconds() -> float:
    """User + system CPU time of this process so far."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pretrain(out: Path, settings: TextPretrainSettings, log: Any = print) -> dict[str, Any]:
    """Pretrain and save the model folder in ``out``; returns the recorded figures."""
    import torch
    from transformers import LlamaForCausalLM

    wall0, cpu0 = time.perf_counter(), cpu_seconds()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        sentences = generate_sentences(settings.sentences, settings.seed)
        held_out = held_out_sentences(settings, set(sentences))
        tokenizer = build_tokenizer(settings, sentences)
        stream = token_stream(tokenizer, sentences)
        log(f"{len(sentences)} sentences, {len(stream)} tokens; {len(held_out)} held-out sentences")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model = LlamaForCausalLM(model_config(settings, tokenizer))
            random_ppl = perplexity(model, tokenizer, held_out)
            losses = train(settings, model, stream, log)
        trained_ppl = perplexity(model, tokenizer, held_out)
    finally:
        torch.set_num_threads(threads)
    figures = {
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_tokens": len(stream),
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]),
        "held_out_perplexity": round(trained_ppl, 3),
        "random_init_perplexity": round(random_ppl, 3),
        "wall_seconds": round(time.perf_counter() - wall0, 1),
        "cpu_seconds": round(cpu_seconds() - cpu0, 1),
        "torch_version": torch.__version__,
    }
    save(out, model, tokenizer, figures)
    return figures


def save(out: Path, model: Any, tokenizer: Any, figures: dict[str, Any]) -> None:
    """The HF folder (fp16 weights), its provenance README and the figures."""
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.half().save_pretrained(out, safe_serialization=True)
    model.float()
    tokenizer.save_pretrained(out)
    tokenizer_file = out / "tokenizer_config.json"
    data = json.loads(tokenizer_file.read_text("utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["chat_template"] = tokenizer.chat_template  # older transformers read it only from here
    tokenizer_file.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "pretraining.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    (out / "README.md").write_text(README.format(**figures, **figures["settings"]), encoding="utf-8")


README = """\
# health-llama: a small pretrained causal LM shipped with loratui

A {parameters:,}-parameter Llama (`LlamaForCausalLM`: {num_hidden_layers} layers, hidden size {hidden_size},
{num_attention_heads} query and {num_key_value_heads} key-value heads; byte-level BPE tokenizer of {vocab_size} ids;
Llama-2 style `[INST]` chat template), stored in fp16. It writes short health-advice sentences in Chinese and
English, the domain of `loratui demo --task text`, and nothing else: it is a demo model, not a source of
medical advice.

## Provenance

Generated by `python -m loratui.tiny_models.pretrain text` (seed {seed}): {sentences:,} sentences produced
from the templates in `loratui/tiny_models/pretrain/text_corpus.py` ({train_tokens:,} tokens), {steps} AdamW
steps of {batch_size} x {seq_len} tokens on a CPU. No downloaded model, weights or text went into it. The
demo's question/answer set (`loratui/demo/text_assets/medical_qa.jsonl`) was not part of the training text.

Held-out generated sentences: perplexity {held_out_perplexity} (the same network at its random
initialisation: {random_init_perplexity}). Pretraining took {wall_seconds} s wall time and {cpu_seconds} s
CPU time. Running the script again reproduces this quality (not the exact bytes). Figures: `pretraining.json`.

## Licence

Apache-2.0, like loratui. The weights and the tokenizer are the output of the seeded script above.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loratui.tiny_models.pretrain text",
        description="Pretrain the shipped small Llama on generated health-advice sentences (CPU).",
    )
    parser.add_argument("--out", type=Path, default=SHIPPED, help=f"model folder (default: {SHIPPED})")
    parser.add_argument("--seed", type=int, default=TextPretrainSettings.seed)
    parser.add_argument("--steps", type=int, default=TextPretrainSettings.steps)
    parser.add_argument("--threads", type=int, default=TextPretrainSettings.threads)
    args = parser.parse_args(argv)
    settings = TextPretrainSettings(seed=args.seed, steps=args.steps, threads=args.threads)
    figures = pretrain(args.out, settings)
    print(
        f"saved {args.out}: held-out perplexity {figures['held_out_perplexity']} "
        f"(random init {figures['random_init_perplexity']}); "
        f"{figures['wall_seconds']} s wall, {figures['cpu_seconds']} s CPU"
    )
    return 0
