"""Activation (gradient) checkpointing on a transformers model, by the name its transformers version has."""

from __future__ import annotations

from typing import Any

NON_REENTRANT = {"use_reentrant": False}


def enable_activation_checkpointing(model: Any, options: dict[str, Any] | None = None) -> None:
    """Turn on activation checkpointing; `options` go to `torch.utils.checkpoint` (None: the library default).

    transformers 5 calls it `activation_checkpointing_enable` and warns on the older
    `gradient_checkpointing_enable`, which is all that transformers 4 has."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
