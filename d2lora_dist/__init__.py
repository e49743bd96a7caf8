"""d2lora-dist: D2LoRA (data-driven LoRA initialisation) at cluster scale."""

__version__ = "0.1.0"
