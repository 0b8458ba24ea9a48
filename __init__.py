"""FLUX.2 LoRA training nodes for ComfyUI: registers the V1 node classes and the web extension."""

from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes.routes import register_with_prompt_server

# Read-only GET routes for the Train LoRA chart (/flux2lora/runs/...); does nothing outside a ComfyUI server.
register_with_prompt_server()

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
