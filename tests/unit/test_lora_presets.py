"""LoRA presets adapt exactly the modules they name, on the tiny FLUX.2 (2 double + 3 single blocks)."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch

from flux2_lora_pack.trainer.lora import (
    LORA_INITS,
    LORA_PRESETS,
    adapted_module_names,
    apply_lora,
    lora_state_dict,
    lora_target_modules,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import tiny_inputs  # noqa: E402

DOUBLE_QKV = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
DOUBLE_OUT = ["attn.to_out.0", "attn.to_add_out"]
DOUBLE_MLP = ["ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out"]


def _double(layers: list[str]) -> set[str]:
    return {f"transformer_blocks.{i}.{layer}" for i in range(2) for layer in layers}


def _single(layers: list[str]) -> set[str]:
    return {f"single_transformer_blocks.{i}.{layer}" for i in range(3) for layer in layers}


EXPECTED = {
    "all": _double(DOUBLE_QKV + DOUBLE_OUT + DOUBLE_MLP) | _single(["attn.to_qkv_mlp_proj", "attn.to_out"]),
    "attention": _double(DOUBLE_QKV + DOUBLE_OUT) | _single(["attn.to_qkv_mlp_proj", "attn.to_out"]),
    "mlp": _double(DOUBLE_MLP),
    "tiny": _double(DOUBLE_QKV) | _single(["attn.to_qkv_mlp_proj"]),
}
EXPECTED_COUNTS = {"all": 30, "attention": 22, "mlp": 8, "tiny": 15}


@pytest.fixture(scope="module")
def base_transformer(tiny_model_dir):
    from diffusers import Flux2Transformer2DModel

    return Flux2Transformer2DModel.from_pretrained(tiny_model_dir / "transformer").eval()


@pytest.fixture
def transformer(base_transformer):
    return copy.deepcopy(base_transformer)


def _inputs() -> dict:
    return {**tiny_inputs(batch=1, h=4, w=4, text=8, reference=False), "return_dict": False}


@pytest.mark.parametrize("preset", LORA_PRESETS)
def test_preset_targets_exactly_the_named_modules(base_transformer, preset):
    names = lora_target_modules(base_transformer, preset=preset)
    assert set(names) == EXPECTED[preset]
    assert len(names) == len(set(names)) == EXPECTED_COUNTS[preset]


def test_presets_partition_every_block_linear(base_transformer):
    block_linears = {
        name
        for name, module in base_transformer.named_modules()
        if isinstance(module, torch.nn.Linear)
        and name.startswith(("transformer_blocks.", "single_transformer_blocks."))
    }
    sets = {p: set(lora_target_modules(base_transformer, preset=p)) for p in LORA_PRESETS}
    assert sets["all"] == block_linears
    assert sets["attention"] | sets["mlp"] == sets["all"]
    assert sets["attention"] & sets["mlp"] == set()
    assert sets["tiny"] < sets["attention"]
    # Single blocks have no separate feed-forward layer: mlp never touches them.
    assert {n for n in sets["mlp"] if n.startswith("single_")} == set()


@pytest.mark.parametrize("preset", LORA_PRESETS)
def test_apply_lora_adapts_and_trains_exactly_the_preset(transformer, preset):
    apply_lora(transformer, preset=preset, rank=4, alpha=2.0)
    assert adapted_module_names(transformer) == EXPECTED[preset]
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora_{ab}.default.weight" for m in EXPECTED[preset] for ab in "AB"}

    state = lora_state_dict(transformer)
    assert set(state) == {f"{m}.lora_{ab}.weight" for m in EXPECTED[preset] for ab in "AB"}
    for module in EXPECTED[preset]:
        base = transformer.get_submodule(module).base_layer
        assert state[f"{module}.lora_A.weight"].shape == (4, base.in_features)
        assert state[f"{module}.lora_B.weight"].shape == (base.out_features, 4)
        assert transformer.get_submodule(module).scaling["default"] == 0.5


def test_unknown_preset_lists_the_valid_ones(transformer):
    with pytest.raises(ValueError, match="'attn' is unknown; valid presets: all, attention, mlp, tiny"):
        lora_target_modules(transformer, preset="attn")
    with pytest.raises(ValueError, match="valid presets: all, attention, mlp, tiny"):
        apply_lora(transformer, preset="attn", rank=4, alpha=4.0)
    assert adapted_module_names(transformer) == set()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rank": 0}, "lora.rank must be an integer >= 1"),
        ({"rank": 2.0}, "lora.rank must be an integer >= 1"),
        ({"alpha": 0.0}, "lora.alpha must be > 0"),
        ({"alpha": -1.0}, "lora.alpha must be > 0"),
        ({"dropout": 1.0}, r"lora.dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"lora.dropout must be in \[0, 1\)"),
        ({"init": "pissa"}, "lora.init 'pissa' is unknown; valid inits: default, gaussian, orthogonal"),
        ({"init": "orthogonal", "rank": 3}, "needs an even lora.rank, got 3"),
    ],
)
def test_bad_options_raise_before_touching_the_model(transformer, kwargs, match):
    options = {"preset": "tiny", "rank": 4, "alpha": 4.0} | kwargs
    with pytest.raises(ValueError, match=match):
        apply_lora(transformer, **options)
    assert adapted_module_names(transformer) == set()
    assert all(p.requires_grad for p in transformer.parameters())


@pytest.mark.parametrize("init", LORA_INITS)
def test_each_init_starts_at_the_base_model(base_transformer, transformer, init):
    apply_lora(transformer, preset="all", rank=4, alpha=8.0, init=init)
    # Base weights untouched (PiSSA-like inits would rewrite them).
    base_weights = dict(base_transformer.named_parameters())
    for name, param in transformer.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, base_weights[name.replace(".base_layer", "")]), name
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(transformer(**x)[0], base_transformer(**x)[0], rtol=0, atol=1e-6)

    module = transformer.get_submodule("transformer_blocks.0.attn.to_q")
    a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
    if init == "default":  # Kaiming-uniform A (a=sqrt(5)): |A| <= 1/sqrt(fan_in); B = 0
        assert not b.any()
        assert a.abs().max() <= 1 / math.sqrt(a.shape[1])
    elif init == "gaussian":  # A ~ N(0, 1/rank); B = 0
        assert not b.any()
        assert abs(a.std().item() - 0.25) < 0.25 * 0.15
    else:  # orthogonal: both non-zero, B @ A = 0
        assert b.abs().max() > 0.01 and a.abs().max() > 0.01
        assert (b @ a).abs().max() < 1e-6


def test_dropout_is_applied_to_every_adapted_module(transformer):
    apply_lora(transformer, preset="attention", rank=2, alpha=2.0, dropout=0.25)
    for name in EXPECTED["attention"]:
        dropout = transformer.get_submodule(name).lora_dropout["default"]
        assert isinstance(dropout, torch.nn.Dropout) and dropout.p == 0.25


@pytest.mark.parametrize("preset", LORA_PRESETS)
def test_the_preflight_counts_the_lora_training_creates_without_building_it(tiny_model_dir, preset):
    """preflight.lora_size counts rank x (in + out) per adapted layer; injecting the LoRA gives the same count."""
    from types import SimpleNamespace

    from flux2_lora_pack.trainer.model_files import inspect_model_folder
    from flux2_lora_pack.trainer.preflight import lora_size, meta_transformer

    folder = inspect_model_folder(tiny_model_dir)
    settings = SimpleNamespace(rank=4, alpha=4.0, dropout=0.0, init="default", target=preset, lycoris=None)
    model = meta_transformer(folder)
    apply_lora(model, preset=preset, rank=4, alpha=4.0, dropout=0.0, init="default")
    injected = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora_size(folder, lora=settings).numel == injected > 0
