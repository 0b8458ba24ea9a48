"""FLUX.2 LoRA trainer: the torchrun program and everything FLUX.2-specific.

Importable without ComfyUI; heavy libraries are imported inside the functions that use them.
"""

__version__ = "0.1.0"
