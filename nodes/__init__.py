"""ComfyUI node classes: a thin UI layer over trainer/. One module per family of nodes."""

from .dependencies import refuse_to_run, report_at_start

# Checked before the node modules import torch: a missing package is named in one start-up message even when an
# import below then fails (torch itself comes with ComfyUI).
_DEPENDENCY_PROBLEM = report_at_start()

from .dataset_nodes import NODE_CLASS_MAPPINGS as _DATASET_NODES  # noqa: E402
from .grid_nodes import NODE_CLASS_MAPPINGS as _GRID_NODES  # noqa: E402
from .model_nodes import NODE_CLASS_MAPPINGS as _MODEL_NODES  # noqa: E402
from .option_nodes import NODE_CLASS_MAPPINGS as _OPTION_NODES  # noqa: E402
from .train_nodes import NODE_CLASS_MAPPINGS as _TRAIN_NODES  # noqa: E402

NODE_CLASS_MAPPINGS: dict[str, type] = {**_MODEL_NODES, **_DATASET_NODES, **_TRAIN_NODES, **_OPTION_NODES,
                                       **_GRID_NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {key: cls.TITLE for key, cls in NODE_CLASS_MAPPINGS.items()}
if _DEPENDENCY_PROBLEM is not None:
    # Still registered (a saved workflow opens and shows its nodes); each refuses at Run with the same message.
    for _node in NODE_CLASS_MAPPINGS.values():
        refuse_to_run(_node)
