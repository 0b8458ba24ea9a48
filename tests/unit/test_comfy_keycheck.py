"""The save-time ComfyUI key check's parts that need no ComfyUI: the trained size read from a file's shapes and header,
and what the check says outside ComfyUI. The check itself runs in a real ComfyUI: tests/e2e/test_comfyui_keycheck.py."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from safetensors.torch import save_file


@pytest.fixture()
def keycheck(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.comfy_keycheck")


def _lora(width: int, *, doubles: int, singles: int, prefix: str = "diffusion_model.") -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i in range(doubles):
        shapes[f"{prefix}double_blocks.{i}.img_attn.qkv.lora_A.weight"] = (4, width)
        shapes[f"{prefix}double_blocks.{i}.img_attn.qkv.lora_B.weight"] = (3 * width, 4)
        shapes[f"{prefix}double_blocks.{i}.img_attn.qkv.alpha"] = ()
    for i in range(singles):
        shapes[f"{prefix}single_blocks.{i}.linear2.lora_A.weight"] = (4, 4 * width)
        shapes[f"{prefix}single_blocks.{i}.linear2.lora_B.weight"] = (width, 4)
    return shapes


def test_a_file_of_unknown_flavour_is_checked_at_its_width_and_block_counts(keycheck):
    size = keycheck.trained_size(_lora(256, doubles=2, singles=3), {})
    assert (size.width, size.double_blocks, size.single_blocks, size.guidance_embed) == (256, 2, 3, True)
    assert size.describe() == "FLUX.2 256 wide, 2 double + 3 single blocks"


def test_a_file_of_a_known_flavour_at_its_width_is_checked_on_the_real_architecture(keycheck):
    # Keys past klein-4b's 5 double / 20 single blocks would be dropped by ComfyUI on the real model: build that.
    size = keycheck.trained_size(_lora(3072, doubles=7, singles=1), {"model_flavour": json.dumps("klein-4b")})
    assert (size.width, size.double_blocks, size.single_blocks, size.guidance_embed, size.context_dim) == (
        3072, 5, 20, False, 7680)
    # Another width than the flavour's (a test model): the file's own block counts.
    tiny = keycheck.trained_size(_lora(256, doubles=2, singles=1), {"model_flavour": json.dumps("klein-4b")})
    assert (tiny.width, tiny.double_blocks, tiny.single_blocks, tiny.guidance_embed) == (256, 2, 1, False)


def test_width_comes_from_lokr_factors_and_diffusers_names(keycheck):
    lokr = {"diffusion_model.single_blocks.0.linear1.lokr_w1": (4, 8),
            "diffusion_model.single_blocks.0.linear1.lokr_w2_a": (1152 // 4 * 9, 2),
            "diffusion_model.single_blocks.0.linear1.lokr_w2_b": (2, 64)}
    assert keycheck.trained_size(lokr, {}).width == 512
    diffusers = {"transformer.single_transformer_blocks.3.attn.to_out.lora_A.weight": (4, 5 * 384),
                 "transformer.single_transformer_blocks.3.attn.to_out.lora_B.weight": (384, 4)}
    size = keycheck.trained_size(diffusers, {})
    assert (size.width, size.single_blocks, size.double_blocks) == (384, 4, 1)


def test_outside_comfyui_the_check_says_it_did_not_run(keycheck, tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"diffusion_model.img_in.lora_A.weight": torch.zeros(1, 1)}, str(path))
    check = keycheck.check_lora_keys(path)
    assert not check.ran and not check.ok
    assert check.line() == ("ComfyUI key check not run: not running inside ComfyUI (no comfy module), so its LoRA "
                            "loader was not asked.")


def test_the_line_names_every_dropped_key(keycheck):
    check = keycheck.KeyCheck(path="x", ran=True, keys=30, dropped=("a.lora_A.weight", "b.alpha"), model="m")
    assert not check.ok
    assert check.line() == ("ComfyUI key check: 2 of 30 keys would be dropped by ComfyUI's LoRA loader (m): "
                            "a.lora_A.weight, b.alpha.")
    assert keycheck.KeyCheck(path="x", ran=True, keys=30, model="m").line() == (
        "ComfyUI key check: all 30 keys load in ComfyUI (m).")
