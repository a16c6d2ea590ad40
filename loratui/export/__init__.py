"""Export trained LoRAs: kohya/A1111 and diffusers files (`sd_export`), PEFT adapters (`llm_export`)."""
