"""higgs-accel: LoRA fine-tuning of Higgs Audio v2 in a plain Accelerate loop, with a structured event log."""

__version__ = "0.1.0"
