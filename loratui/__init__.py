"""loratui: a LoRA fine-tuning assistant for the terminal.

Importing this package is cheap: no torch, diffusers, transformers, peft or textual.
"""

__version__ = "0.1.0"
