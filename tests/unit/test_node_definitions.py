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
