"""FLUX.2 LoRA training nodes for ComfyUI: registers the V1 node classes and the web extension."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.routes import register_with_prompt_server

# Read-only GET routes for the Train LoRA chart (/flux2lora/runs/...); does nothing outside a ComfyUI server.
if register_with_prompt_server():
    from .trainer.launch import start_warm_trainer

    # Inside ComfyUI: a process that has the trainer's imports done before Run is pressed (trainer/warm_worker.py).
    start_warm_trainer()

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
