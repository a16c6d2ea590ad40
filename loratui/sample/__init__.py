"""Generation with trained LoRAs: images (`sd_sample`) and text (`llm_sample`)."""
