"""DLP-LoRA: a dynamic, lightweight plugin that fuses task-specific LoRAs per sentence (arXiv 2410.01497)."""

__version__ = "0.1.0"
