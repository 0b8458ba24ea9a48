"""Memory / Speed / Schedule / Validation Options: widgets built from the config's declarations, chained, merged."""

from __future__ import annotations

import importlib
import json

import pytest
from flux2_lora_pack.trainer.config import CHOICES, DEFAULTS
from flux2_lora_pack.trainer.settings import field_docs
from flux2_lora_pack.trainer.tread import TreadRoute

NODE_KEYS = {
    "Flux2LoraMemoryOptions": {"base_model_precision", "quantize_via", "enable_group_offload", "group_offload_type",
                               "group_offload_blocks_per_group", "group_offload_use_stream",
                               "gradient_checkpointing_interval"},
    "Flux2LoraSpeedOptions": {"tread_config"},
    "Flux2LoraScheduleOptions": {"optimizer", "lr_scheduler", "lr_warmup_steps", "lr_end", "lr_num_cycles",
                                 "max_grad_norm"},
    "Flux2LoraValidationOptions": {"user_prompt_library", "validation_resolution", "validation_num_inference_steps",
                                   "validation_guidance", "num_validation_images", "validation_reference_images"},
}


@pytest.fixture
def opts(pack, comfy_root):
    (comfy_root / "input").mkdir(exist_ok=True)
    return importlib.import_module(f"{pack.__name__}.nodes.option_nodes")


@pytest.fixture
def train_nodes(pack, comfy_root):
    return importlib.import_module(f"{pack.__name__}.nodes.train_nodes")


def _defaults(cls) -> dict:
    return {name: entry[1]["default"] for name, entry in cls.INPUT_TYPES()["required"].items()}


def _run(pack, node_id, options=None, **changes):
    cls = pack.NODE_CLASS_MAPPINGS[node_id]
    (out,) = cls().build(options, **{**_defaults(cls), **changes})
    return out


def test_each_node_sets_exactly_its_keys(pack, opts):
    for node_id, keys in NODE_KEYS.items():
        out = _run(pack, node_id)
        assert set(out.values) == keys, node_id
        assert set(out.sources.values()) == {pack.NODE_CLASS_MAPPINGS[node_id].TITLE}


def test_widgets_come_from_the_config_declarations(pack, opts):
    """Default, choices, lower/upper bound and tooltip of each widget are the key's own; the tooltip names the key."""
    for node_id in ("Flux2LoraMemoryOptions", "Flux2LoraScheduleOptions", "Flux2LoraValidationOptions"):
        for key, (kind, options) in pack.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()["required"].items():
            assert options["tooltip"].endswith(f"Key: {key}."), key
            _, _, doc = opts._declaration(key)
            assert options["tooltip"].startswith(doc), key
            if isinstance(kind, list):
                assert kind == list(CHOICES[key]) and options["default"] == DEFAULTS[key], key
            elif kind in ("INT", "FLOAT") and DEFAULTS[key] is not None:
                assert options["default"] == DEFAULTS[key], key
    schedule = pack.NODE_CLASS_MAPPINGS["Flux2LoraScheduleOptions"].INPUT_TYPES()["required"]
    assert (schedule["lr_warmup_steps"][1]["min"], schedule["lr_num_cycles"][1]["min"]) == (0, 1)  # ge=0, ge=1
    validation = pack.NODE_CLASS_MAPPINGS["Flux2LoraValidationOptions"].INPUT_TYPES()["required"]
    assert (validation["num_validation_images"][1]["min"], validation["num_validation_images"][1]["max"]) == (1, 16)
    assert validation["validation_guidance"][1]["min"] == pytest.approx(0.1)  # gt=0: one step above
    memory = pack.NODE_CLASS_MAPPINGS["Flux2LoraMemoryOptions"].INPUT_TYPES()["required"]
    assert memory["gradient_checkpointing_interval"][1] | {"tooltip": ""} == {
        "default": 0, "min": 0, "max": 64, "step": 1, "tooltip": ""}  # null shown as 0
    speed = pack.NODE_CLASS_MAPPINGS["Flux2LoraSpeedOptions"].INPUT_TYPES()["required"]
    for name, doc in field_docs(TreadRoute).items():
        assert speed[name][1]["tooltip"].startswith(doc) and "tread_config" in speed[name][1]["tooltip"]


def test_a_chain_merges_and_leaves_its_input_unchanged(pack, opts):
    memory = _run(pack, "Flux2LoraMemoryOptions", base_model_precision="int8-quanto", gradient_checkpointing_interval=2)
    speed = _run(pack, "Flux2LoraSpeedOptions", memory, start_layer_idx=1, end_layer_idx=-1)
    schedule = _run(pack, "Flux2LoraScheduleOptions", speed, lr_scheduler="cosine", lr_warmup_steps=10)
    validation = _run(pack, "Flux2LoraValidationOptions", schedule, validation_resolution="512x256")
    assert set(validation.values) == set().union(*NODE_KEYS.values())
    assert set(memory.values) == NODE_KEYS["Flux2LoraMemoryOptions"]  # the chain did not write into its input
    assert validation.settings() == {
        "base_model_precision": "int8-quanto", "gradient_checkpointing_interval": 2,
        "tread_config": {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -1}]},
        "lr_scheduler": "cosine", "lr_warmup_steps": 10, "validation_resolution": "512x256"}
    assert validation.sources["lr_scheduler"] == "Schedule Options (FLUX.2)"


def test_options_at_the_trainer_defaults_leave_the_settings_and_the_run_identity_alone(pack, opts, train_nodes):
    chain = None
    for node_id in ("Flux2LoraMemoryOptions", "Flux2LoraScheduleOptions", "Flux2LoraValidationOptions"):
        chain = _run(pack, node_id, chain)
    widgets = {"learning_rate": 1e-4, "validation_prompt": "a fox", "validation_steps": 10}
    assert chain.settings() == {}
    assert train_nodes.training_settings(widgets, extra_config_json="", options=chain) == \
        train_nodes.training_settings(widgets, extra_config_json="")
    off = _run(pack, "Flux2LoraSpeedOptions", selection_ratio=0.0)
    assert off.values == {"tread_config": None} and off.settings() == {}


def test_a_key_set_by_two_option_nodes_is_refused_naming_both(pack, opts):
    first = _run(pack, "Flux2LoraScheduleOptions")
    with pytest.raises(ValueError, match=r"optimizer is set twice: by Schedule Options \(FLUX.2\) and by Schedule "
                                         r"Options \(FLUX.2\)"):
        _run(pack, "Flux2LoraScheduleOptions", first)
    custom = opts.TrainOptions().plus({"tread_config": None}, source="My Node")
    with pytest.raises(ValueError, match=r"tread_config is set twice: by My Node and by Speed Options \(FLUX.2\)"):
        _run(pack, "Flux2LoraSpeedOptions", custom)


@pytest.mark.parametrize("extra", ['{"lr_scheduler": "cosine"}', '{"--lr_scheduler": "cosine"}'])
def test_a_key_set_by_an_option_node_and_extra_config_json_is_refused(pack, opts, train_nodes, extra):
    chain = _run(pack, "Flux2LoraScheduleOptions")
    with pytest.raises(ValueError, match=r"lr_scheduler is set twice: by Schedule Options \(FLUX.2\) and by "
                                         r"extra_config_json"):
        train_nodes.training_settings({"learning_rate": 1e-4}, extra_config_json=extra, options=chain)
    # Keys the options do not set still come from extra_config_json.
    settings = train_nodes.training_settings({"learning_rate": 1e-4}, extra_config_json='{"lr_power": 1.0}',
                                             options=chain)
    assert settings["lr_power"] == 1.0


def test_option_keys_are_not_train_lora_widgets_and_a_clash_names_the_widget(pack, opts, train_nodes):
    train_spec = pack.NODE_CLASS_MAPPINGS["Flux2LoraTrain"].INPUT_TYPES()
    train_inputs = {*train_spec["required"], *train_spec["optional"]}
    assert train_inputs & set().union(*NODE_KEYS.values()) == set()
    clash = opts.TrainOptions().plus({"validation_steps": 5}, source="Validation Options (FLUX.2)")
    with pytest.raises(ValueError, match=r"validation_steps is set twice: by Validation Options \(FLUX.2\) and by "
                                         r"Train LoRA's validation_steps widget"):
        train_nodes.training_settings({"validation_steps": 10}, extra_config_json="", options=clash)


@pytest.mark.parametrize("node_id, changes, match", [
    ("Flux2LoraValidationOptions", {"validation_resolution": "1000"}, "validation_resolution '1000': width 1000"),
    ("Flux2LoraValidationOptions", {"validation_guidance": 0.0}, "validation_guidance must be > 0"),
    ("Flux2LoraValidationOptions", {"user_prompt_library": "missing.json"}, "user_prompt_library .* does not exist"),
    ("Flux2LoraValidationOptions", {"user_prompt_library": "/etc/passwd"},
     r"Validation Options \(FLUX.2\) user_prompt_library '/etc/passwd' is outside the folders"),
    ("Flux2LoraValidationOptions", {"validation_reference_images": "ref.png\n../../x.png"},
     r"validation_reference_images '.*/input/\.\./\.\./x\.png' is outside the folders"),
    ("Flux2LoraScheduleOptions", {"lr_warmup_steps": -1}, "lr_warmup_steps must be >= 0"),
    ("Flux2LoraScheduleOptions", {"lr_scheduler": "cosine_annealing"}, "lr_scheduler must be one of"),
    ("Flux2LoraMemoryOptions", {"group_offload_blocks_per_group": 0}, "group_offload_blocks_per_group must be >= 1"),
    ("Flux2LoraSpeedOptions", {"start_layer_idx": 10, "end_layer_idx": 5}, r"tread_config.routes\[0\]: start_layer_idx 10"),
    ("Flux2LoraSpeedOptions", {"route_2_selection_ratio": 1.5}, r"tread_config.routes\[1\].selection_ratio"),
])
def test_a_bad_value_is_refused_naming_the_key(pack, opts, comfy_root, node_id, changes, match):
    from PIL import Image

    Image.new("RGB", (64, 64)).save(comfy_root / "input" / "ref.png")
    with pytest.raises(ValueError, match=match):
        _run(pack, node_id, **changes)


def test_validation_files_resolve_inside_the_input_folder(pack, opts, comfy_root):
    from PIL import Image

    (comfy_root / "input" / "prompts.json").write_text(json.dumps({"fox": "a fox"}))
    for name in ("a.png", "b.png"):
        Image.new("RGB", (64, 64)).save(comfy_root / "input" / name)
    out = _run(pack, "Flux2LoraValidationOptions", user_prompt_library="prompts.json",
               validation_reference_images="a.png\n\nb.png\n")
    assert out.values["user_prompt_library"] == str(comfy_root / "input" / "prompts.json")
    assert out.values["validation_reference_images"] == [str(comfy_root / "input" / n) for n in ("a.png", "b.png")]
    one = _run(pack, "Flux2LoraValidationOptions", validation_reference_images="a.png")
    assert one.values["validation_reference_images"] == str(comfy_root / "input" / "a.png")
    node = pack.NODE_CLASS_MAPPINGS["Flux2LoraValidationOptions"]
    assert node.VALIDATE_INPUTS(user_prompt_library="prompts.json", validation_reference_images="a.png") is True
    message = node.VALIDATE_INPUTS(user_prompt_library="", validation_reference_images="a.png\nnone.png")
    assert isinstance(message, str) and "validation_reference_images" in message and "does not exist" in message
