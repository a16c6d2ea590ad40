"""Text generation with the chat template used in training."""

from __future__ import annotations

from typing import Any


def generate_answer(
    model: Any,
    tokenizer: Any,
    template: str,
    prompt: str,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 1,
) -> str:
    """The model's answer to one user prompt (greedy when temperature is 0). Leaves global RNG untouched."""
    import torch
    from transformers import GenerationConfig

    from loratui.models.llm.chat import prompt_ids

    device = next(model.parameters()).device
    ids = torch.tensor(
        [prompt_ids(tokenizer, template, [{"role": "user", "content": prompt}])], device=device
    )
    eos = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos |= set(extra) if isinstance(extra, list) else ({extra} if extra is not None else set())
    eos.discard(None)
    sampling = temperature > 0
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos),
        eos_token_id=sorted(eos),
        use_cache=True,
    )
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(seed)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
