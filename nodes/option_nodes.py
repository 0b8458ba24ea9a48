"""Memory, Speed, Schedule and Validation Options (FLUX.2): typed widgets for trainer keys, chained into Train LoRA.

Each option node takes an optional FLUX2_TRAIN_OPTIONS input and outputs it with its own keys added, so a user wires
Memory -> Speed -> Schedule -> Validation -> Train LoRA's `options` input instead of typing JSON. A key set twice
(by two option nodes, or by an option node and Train LoRA's widgets or extra_config_json) is refused, naming both.

Every widget is built from the trainer's declaration of its key (trainer/config.py and the modules of its groups):
the default, the choices, the bounds and the tooltip (the docstring under the field, ending with the key). Only an
upper bound the config leaves open (a UI limit) and a float's step are given here.

Run identity: a widget left at the trainer's default is not written into the run's settings, so an options chain at
its defaults trains the same run (and reuses its folder) as no options at all; it still counts as set for the
set-twice rule, because the user sees its value on the node.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from .model_nodes import CATEGORY

OPTIONS_TYPE = "FLUX2_TRAIN_OPTIONS"
_OPTIONS_INPUT = (OPTIONS_TYPE, {"tooltip": ("Options from another option node (Memory, Speed, Schedule or Validation "
                                             "Options), chained: this node adds its keys to them.")})
_OUTPUT_TOOLTIP = (("The options so far plus this node's keys: connect to the next option node or to Train LoRA's "
                    "options input."),)


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainOptions:
    """FLUX2_TRAIN_OPTIONS: trainer keys set by a chain of option nodes, each with the node that set it."""

    values: dict[str, Any] = field(default_factory=dict)
    """Flat trainer key -> value, as run.json spells it."""
    sources: dict[str, str] = field(default_factory=dict)
    """Flat trainer key -> the title of the option node that set it."""

    def plus(self, values: dict[str, Any], *, source: str) -> TrainOptions:
        """A new chain with `values` added (this one is not changed); a key set already is refused, naming both."""
        self.check_unset({key: source for key in values})
        return TrainOptions(values={**copy.deepcopy(self.values), **copy.deepcopy(values)},
                            sources={**self.sources, **{key: source for key in values}})

    def check_unset(self, elsewhere: dict[str, str]) -> None:
        """Refuse a key these options set that is also set elsewhere (key -> where), naming both places."""
        for key, where in elsewhere.items():
            if key in self.sources:
                raise ValueError(f"{key} is set twice: by {self.sources[key]} and by {where}; set it in one place "
                                 "(remove it from one of them).")

    def settings(self) -> dict[str, Any]:
        """The keys whose value differs from the trainer's default: what the run's settings (and identity) get."""
        from ..trainer.config import DEFAULTS

        return {key: copy.deepcopy(value) for key, value in self.values.items()
                if key not in DEFAULTS or value != DEFAULTS[key]}


def _declaration(key: str):
    """(Setting, type hint, docstring) of a flat key, read from the dataclass that declares it."""
    from ..trainer.config import KEYS, TrainConfig
    from ..trainer.settings import field_docs, field_setting

    owner: Any = TrainConfig
    *groups, name = KEYS[key]
    for group in groups:
        owner = typing.get_type_hints(owner)[group]
    declared = next(f for f in dataclasses.fields(owner) if f.name == name)
    return field_setting(declared), typing.get_type_hints(owner)[name], field_docs(owner)[name]


def _nullable_number(key: str) -> bool:
    """An int key whose null default the widget shows as 0 (its range starts at 1, so 0 is free)."""
    from ..trainer.config import DEFAULTS
    from ..trainer.settings import split_optional

    spec, hint, _ = _declaration(key)
    base, optional = split_optional(hint)
    return base is int and optional and DEFAULTS.get(key) is None and (spec.ge or 0) >= 1


def input_spec(key: str, *, ui_max: float | None = None, step: float | None = None) -> tuple[Any, dict[str, Any]]:
    """The ComfyUI input for one trainer key, from its declaration: type, default, choices, bounds, tooltip + key.

    ui_max: the widget's upper bound where the config sets none; step: a FLOAT's step (INT: 1).
    """
    from ..trainer.config import CHOICES, DEFAULTS
    from ..trainer.settings import PATHS, split_optional

    spec, hint, doc = _declaration(key)
    tooltip = f"{doc} Key: {key}."
    default = DEFAULTS[key]
    if key in CHOICES:
        return list(CHOICES[key]), {"default": default, "tooltip": tooltip}
    if hint == PATHS:
        return "STRING", {"default": "", "multiline": True,
                          "tooltip": f"{doc} One file per line, relative paths inside ComfyUI's input folder; empty "
                                     f"for none. Key: {key}."}
    base, _ = split_optional(hint)
    if base is bool:
        return "BOOLEAN", {"default": default, "tooltip": tooltip}
    if base is Path:
        return "STRING", {"default": "", "tooltip": f"{doc} A relative path is inside ComfyUI's input folder; empty for "
                                                    f"none. Key: {key}."}
    if base is str:
        return "STRING", {"default": default or "", "tooltip": tooltip}
    assert base in (int, float), f"no widget for {key} ({hint!r})"
    step = 1 if base is int else step
    assert step is not None, f"FLOAT key {key} needs a step"
    low = spec.ge if spec.ge is not None else (spec.gt + step if spec.gt is not None else None)
    high = spec.le if spec.le is not None else (spec.lt - step if spec.lt is not None else None)
    assert low is not None, f"{key} declares no lower bound"
    assert (high is None) != (ui_max is None), f"{key}: give ui_max exactly when the config sets no upper bound"
    if _nullable_number(key):
        low, default, tooltip = 0, 0, f"{doc} 0 stands for null. Key: {key}."
    options = {"default": default, "min": base(low), "max": base(high if high is not None else ui_max),
               "step": step, "tooltip": tooltip}
    if base is float:
        options["round"] = False  # small rates (lr_end 4e-7) must not be rounded to the step
    return ("INT" if base is int else "FLOAT"), options


def config_value(key: str, raw: Any, *, node: str) -> Any:
    """A widget's value as run.json holds it, checked against the key's declaration (errors name the key)."""
    from ..trainer.config import parse_resolution
    from ..trainer.settings import (
        PATHS,
        check_file,
        check_range,
        convert,
        split_optional,
    )

    spec, hint, _ = _declaration(key)
    if hint == PATHS:
        files = [_input_file(line, key=key, node=node) for line in str(raw).splitlines() if line.strip()]
        for path in files:
            check_file(key, Path(path), what="an image file (PNG, JPEG, WebP) in ComfyUI's input folder")
        return None if not files else files[0] if len(files) == 1 else files
    base, _ = split_optional(hint)
    if base is Path:
        if not str(raw).strip():
            return None
        path = _input_file(str(raw), key=key, node=node)
        check_file(key, Path(path), what="an existing file in ComfyUI's input folder")
        return path
    if _nullable_number(key) and raw == 0:
        return None
    value = convert(key, raw, hint, from_json=False)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        check_range(key, value, ge=spec.ge, gt=spec.gt, le=spec.le, lt=spec.lt, fix=spec.fix)
    if key == "validation_resolution":
        parse_resolution(value, key=key)
    return value


def _input_file(text: str, *, key: str, node: str) -> str:
    from .train_nodes import resolve_input_file

    return resolve_input_file(text, input_name=f"{node} {key}")


class _OptionNode:
    """An option node: its widgets are trainer keys (WIDGETS: key -> input_spec arguments). OPTIONAL_WIDGETS: keys
    added after the node shipped, optional so that saved workflows without them still run (trainer default)."""

    WIDGETS: ClassVar[dict[str, dict[str, float]]] = {}
    OPTIONAL_WIDGETS: ClassVar[dict[str, dict[str, float]]] = {}
    CATEGORY = CATEGORY
    RETURN_TYPES = (OPTIONS_TYPE,)
    RETURN_NAMES = ("options",)
    OUTPUT_TOOLTIPS = _OUTPUT_TOOLTIP
    FUNCTION = "build"
    TITLE = ""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {key: input_spec(key, **kw) for key, kw in cls.WIDGETS.items()},
                "optional": {"options": _OPTIONS_INPUT,
                             **{key: input_spec(key, **kw) for key, kw in cls.OPTIONAL_WIDGETS.items()}}}

    def values(self, widgets: dict[str, Any]) -> dict[str, Any]:
        keys = {**self.WIDGETS, **self.OPTIONAL_WIDGETS}
        unknown = sorted(set(widgets) - set(keys))
        if unknown:
            raise ValueError(f"{self.TITLE}: unknown input(s) {unknown}.")
        return {key: config_value(key, widgets[key], node=self.TITLE) for key in keys if key in widgets}

    def build(self, options: TrainOptions | None = None, **widgets):
        return ((options or TrainOptions()).plus(self.values(widgets), source=self.TITLE),)


class Flux2MemoryOptions(_OptionNode):
    TITLE = "Memory Options (FLUX.2)"
    DESCRIPTION = (
        "GPU memory settings of Train LoRA: base-model weight quantization, group offload of the transformer's "
        "blocks, and how many blocks gradient checkpointing recomputes. Chain into Train LoRA's options input. The "
        "text encoder's precision and offload are Load FLUX.2's, gradient_checkpointing and mixed_precision Train "
        "LoRA's widgets."
    )
    WIDGETS: ClassVar[dict[str, dict[str, float]]] = {
        "base_model_precision": {},
        "quantize_via": {},
        "enable_group_offload": {},
        "group_offload_type": {},
        "group_offload_blocks_per_group": {"ui_max": 64},
        "group_offload_use_stream": {},
        "gradient_checkpointing_interval": {"ui_max": 64},
    }
    OPTIONAL_WIDGETS: ClassVar[dict[str, dict[str, float]]] = {
        "gradient_checkpointing_auto": {},
        "gradient_checkpointing_save_attention": {},
        "dynamo_backend": {},
    }


# No trainer default exists for a route (tread_config is null): these are the route of the config's own example
# (trainer/config.py tread_config), SimpleTuner's FLUX.2 quickstart route.
_ROUTE_DEFAULTS = {"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -2}
_MAX_LAYER = 128  # above any FLUX.2's 56 blocks; the trainer checks the route against the model's block count


class Flux2SpeedOptions(_OptionNode):
    TITLE = "Speed Options (FLUX.2)"
    DESCRIPTION = (
        "TREAD token routing for faster training steps: in each route a share of the image tokens skips the blocks "
        "from start_layer_idx to end_layer_idx. Two routes; a route with selection_ratio 0 is off, and with both off "
        "TREAD is off. Sets tread_config. Chain into Train LoRA's options input."
    )
    ROUTES = ("", "route_2_")

    @classmethod
    def INPUT_TYPES(cls):
        from ..trainer.settings import field_docs
        from ..trainer.tread import TreadRoute

        docs = field_docs(TreadRoute)
        required = {}
        for prefix in cls.ROUTES:
            which = "Route 2 (optional): " if prefix else ""
            for name, doc in docs.items():
                tip = f"{which}{doc} 0 turns this route off. Key: tread_config.routes[].{name}." \
                    if name == "selection_ratio" else f"{which}{doc} Key: tread_config.routes[].{name}."
                default = 0.0 if prefix and name == "selection_ratio" else _ROUTE_DEFAULTS[name]
                if name == "selection_ratio":  # TreadRoute takes [0, 1) (tread._check_route)
                    spec = ("FLOAT", {"default": default, "min": 0.0, "max": 0.99, "step": 0.01, "tooltip": tip})
                else:
                    spec = ("INT", {"default": default, "min": -_MAX_LAYER, "max": _MAX_LAYER - 1, "step": 1,
                                    "tooltip": tip})
                required[prefix + name] = spec
        return {"required": required, "optional": {"options": _OPTIONS_INPUT}}

    def values(self, widgets: dict[str, Any]) -> dict[str, Any]:
        from ..trainer.tread import TreadConfig

        names = tuple(_ROUTE_DEFAULTS)
        unknown = sorted(set(widgets) - {p + n for p in self.ROUTES for n in names})
        if unknown:
            raise ValueError(f"{self.TITLE}: unknown input(s) {unknown}.")
        routes = [{n: widgets.get(p + n, _ROUTE_DEFAULTS[n]) for n in names} for p in self.ROUTES
                  if widgets.get(p + "selection_ratio", 0.0 if p else _ROUTE_DEFAULTS["selection_ratio"])]
        if not routes:
            return {"tread_config": None}
        value = {"routes": routes}
        TreadConfig.from_dict(value)  # errors name tread_config.routes[i].<field>
        return {"tread_config": value}


class Flux2ScheduleOptions(_OptionNode):
    TITLE = "Schedule Options (FLUX.2)"
    DESCRIPTION = (
        "Optimizer and learning-rate schedule of Train LoRA: the optimizer, the scheduler with its warm-up, end rate "
        "and cycles, and gradient-norm clipping. learning_rate and max_train_steps stay Train LoRA's widgets. Chain "
        "into Train LoRA's options input."
    )
    WIDGETS: ClassVar[dict[str, dict[str, float]]] = {
        "optimizer": {},
        "lr_scheduler": {},
        "lr_warmup_steps": {"ui_max": 1_000_000},
        "lr_end": {"ui_max": 1.0, "step": 1e-7},
        "lr_num_cycles": {"ui_max": 100},
        "max_grad_norm": {"ui_max": 1000.0, "step": 0.1},
    }


class Flux2ValidationOptions(_OptionNode):
    TITLE = "Validation Options (FLUX.2)"
    DESCRIPTION = (
        "How Train LoRA renders its validation images: a prompt library file, the image size, sampling steps, "
        "guidance, images per prompt and reference images for edit LoRAs. The prompt itself and how often (every N "
        "steps) are Train LoRA's validation_prompt and validation_steps widgets. Chain into Train LoRA's options input."
    )
    WIDGETS: ClassVar[dict[str, dict[str, float]]] = {
        "user_prompt_library": {},
        "validation_resolution": {},
        "validation_num_inference_steps": {"ui_max": 1000},
        "validation_guidance": {"ui_max": 30.0, "step": 0.1},
        "num_validation_images": {},
        "validation_reference_images": {},
    }

    @classmethod
    def VALIDATE_INPUTS(cls, user_prompt_library: str = "", validation_reference_images: str = ""):
        """A file outside the allowed folders, or missing, is reported before the graph runs."""
        try:
            for key, raw in (("user_prompt_library", user_prompt_library),
                             ("validation_reference_images", validation_reference_images)):
                config_value(key, raw, node=cls.TITLE)
        except ValueError as exc:
            return str(exc)
        return True


NODE_CLASS_MAPPINGS = {
    "Flux2LoraMemoryOptions": Flux2MemoryOptions,
    "Flux2LoraSpeedOptions": Flux2SpeedOptions,
    "Flux2LoraScheduleOptions": Flux2ScheduleOptions,
    "Flux2LoraValidationOptions": Flux2ValidationOptions,
}
