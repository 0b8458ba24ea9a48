"""Every node follows the V1 contract users and saved workflows rely on (called without ComfyUI)."""

from __future__ import annotations


NUMERIC = {"INT", "FLOAT"}


def _nodes(pack):
    return sorted(pack.NODE_CLASS_MAPPINGS.items())


def test_registration(pack):
    assert pack.WEB_DIRECTORY == "./web/js"
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(pack.NODE_CLASS_MAPPINGS)
    for node_id, cls in _nodes(pack):
        assert node_id.startswith("Flux2Lora"), node_id
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id] == cls.TITLE
    titles = set(pack.NODE_DISPLAY_NAME_MAPPINGS.values())
    # ComfyUI already has "Train LoRA", "Load LoRA", "Save LoRA": ours must not clash.
    assert not titles & {"Train LoRA", "Load LoRA", "Save LoRA", "KSampler", "Load Checkpoint"}
    assert {"Load FLUX.2", "Mistral Encode (FLUX.2)", "FLUX.2 Sample"} <= titles


def test_every_input_has_tooltip_and_numeric_bounds(pack):
    for node_id, cls in _nodes(pack):
        spec = cls.INPUT_TYPES()
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                options = entry[1] if len(entry) > 1 else {}
                assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
                if isinstance(entry[0], str) and entry[0] in NUMERIC:
                    for key in ("default", "min", "max", "step"):
                        assert key in options, f"{node_id}.{name} lacks {key}"
                    assert options["min"] <= options["default"] <= options["max"], f"{node_id}.{name}"


def test_outputs_are_described(pack):
    for node_id, cls in _nodes(pack):
        assert cls.CATEGORY.startswith("FLUX.2"), node_id
        assert cls.DESCRIPTION, node_id
        assert hasattr(cls, cls.FUNCTION), node_id
        n = len(cls.RETURN_TYPES)
        assert len(cls.RETURN_NAMES) == n and len(cls.OUTPUT_TOOLTIPS) == n, node_id


def test_every_node_has_a_help_page(pack):
    from pathlib import Path

    docs = Path(pack.__file__).parent / "web" / "js" / "docs"
    for node_id in pack.NODE_CLASS_MAPPINGS:
        page = docs / f"{node_id}.md"
        assert page.is_file() and page.read_text(encoding="utf-8").startswith("# "), node_id


def test_build_dataset_outputs_and_inputs_only_grow_at_the_end(pack):
    """Saved workflows link outputs by slot and fill widgets in order: the preview came after the shipped ones."""
    cls = pack.NODE_CLASS_MAPPINGS["Flux2LoraBuildDataset"]
    assert cls.RETURN_TYPES == ("FLUX2_DATASET", "INT", "STRING", "IMAGE")
    assert cls.RETURN_NAMES == ("dataset", "num_images", "report", "preview")
    optional = cls.INPUT_TYPES()["optional"]
    assert list(optional)[-1] == "preview_per_bucket"
    assert optional["preview_per_bucket"][1]["default"] >= 1  # a preview unless the user turns it off


def test_lora_grid_definition_is_pinned(pack):
    """Saved workflows link outputs by slot and fill widgets in order."""
    cls = pack.NODE_CLASS_MAPPINGS["Flux2LoraGrid"]
    assert cls.TITLE == "LoRA Grid (FLUX.2)"
    assert cls.RETURN_TYPES == ("IMAGE", "IMAGE") and cls.RETURN_NAMES == ("grid", "cells")
    spec = cls.INPUT_TYPES()
    assert list(spec["required"]) == ["model", "lora", "checkpoints", "strengths", "width", "height", "steps",
                                      "guidance", "seed"]
    assert list(spec["optional"]) == ["positive", "prompts", "negative"]
    assert spec["required"]["lora"][0] == "FLUX2_LORA" and spec["required"]["checkpoints"][1]["default"] == "all"
    assert spec["required"]["strengths"][1]["default"] == "0, 0.5, 1.0, 1.25"
    assert spec["required"]["seed"][1]["control_after_generate"] is False  # every cell and every re-run: one seed


OPTION_NODES = {
    "Flux2LoraMemoryOptions": ("Memory Options (FLUX.2)", [
        "base_model_precision", "quantize_via", "enable_group_offload", "group_offload_type",
        "group_offload_blocks_per_group", "group_offload_use_stream", "gradient_checkpointing_interval"]),
    "Flux2LoraSpeedOptions": ("Speed Options (FLUX.2)", [
        "selection_ratio", "start_layer_idx", "end_layer_idx",
        "route_2_selection_ratio", "route_2_start_layer_idx", "route_2_end_layer_idx"]),
    "Flux2LoraScheduleOptions": ("Schedule Options (FLUX.2)", [
        "optimizer", "lr_scheduler", "lr_warmup_steps", "lr_end", "lr_num_cycles", "max_grad_norm"]),
    "Flux2LoraValidationOptions": ("Validation Options (FLUX.2)", [
        "user_prompt_library", "validation_resolution", "validation_num_inference_steps", "validation_guidance",
        "num_validation_images", "validation_reference_images"]),
}

OPTIONAL_ADDED = {  # widgets added after a node shipped: optional, so saved workflows without them still run
    "Flux2LoraMemoryOptions": ["gradient_checkpointing_auto", "gradient_checkpointing_save_attention", "dynamo_backend"],
}


def test_option_nodes_are_pinned(pack):
    """Saved workflows fill widgets in order and link by type: ids, titles, inputs and output never change."""
    for node_id, (title, widgets) in OPTION_NODES.items():
        cls = pack.NODE_CLASS_MAPPINGS[node_id]
        spec = cls.INPUT_TYPES()
        assert cls.TITLE == title
        assert list(spec["required"]) == widgets, node_id
        assert list(spec["optional"]) == ["options", *OPTIONAL_ADDED.get(node_id, [])], node_id  # new ones last
        assert spec["optional"]["options"][0] == "FLUX2_TRAIN_OPTIONS", node_id
        assert (cls.RETURN_TYPES, cls.RETURN_NAMES) == (("FLUX2_TRAIN_OPTIONS",), ("options",)), node_id
    train_optional = list(pack.NODE_CLASS_MAPPINGS["Flux2LoraTrain"].INPUT_TYPES()["optional"])
    assert train_optional[-1] == "options"  # added after the shipped inputs
    assert pack.NODE_CLASS_MAPPINGS["Flux2LoraTrain"].INPUT_TYPES()["optional"]["options"][0] == "FLUX2_TRAIN_OPTIONS"
