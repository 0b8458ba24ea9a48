"""ComfyUI node classes: a thin UI layer over trainer/. One module per family of nodes."""

from .dataset_nodes import NODE_CLASS_MAPPINGS as _DATASET_NODES
from .model_nodes import NODE_CLASS_MAPPINGS as _MODEL_NODES
from .train_nodes import NODE_CLASS_MAPPINGS as _TRAIN_NODES

NODE_CLASS_MAPPINGS: dict[str, type] = {**_MODEL_NODES, **_DATASET_NODES, **_TRAIN_NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {key: cls.TITLE for key, cls in NODE_CLASS_MAPPINGS.items()}
