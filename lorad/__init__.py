"""lorad: keep LoRA folders small without losing anything."""

__version__ = "0.1.0"
