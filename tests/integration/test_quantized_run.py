"""Memory modes as users run them (`python -m trainer train`, torchrun for DDP): an int8-quanto base with LoRA
on top, and group offload of the frozen block weights, each against a plain run on the tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

STEPS = 4
COMMON = {"max_train_steps": STEPS, "gradient_checkpointing": True, "lora_rank": 4, "lora_alpha": 2,
          "learning_rate": 1e-3}


def _lora(path):
    with safe_open(str(path / "lora.safetensors"), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}, fh.metadata()  # noqa: SIM118 (safe_open has no __iter__)


@pytest.fixture(scope="module")
def plain_run(tiny_model_dir, square_dataset, tmp_path_factory, runs):
    out = tmp_path_factory.mktemp("plain") / "run"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, **COMMON))
    return out


def test_int8_base_trains_and_saves_the_same_lora_layout(tiny_model_dir, square_dataset, plain_run, tmp_path, runs):
    out = tmp_path / "int8"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, **COMMON, base_model_precision="int8-quanto",
                                base_model_default_dtype="fp32", quantize_via="cpu"))
    losses, plain_losses = runs.step_losses(out), runs.step_losses(plain_run)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    # Same batches and noise; int8 weights move the loss by well under 5 % of its value.
    assert abs(losses[1] - plain_losses[1]) < 0.05 * plain_losses[1], (losses, plain_losses)
    state, meta = _lora(out)
    plain_state, plain_meta = _lora(plain_run)
    assert set(state) == set(plain_state)
    assert all(state[k].shape == plain_state[k].shape for k in state)
    assert {k: meta[k] for k in ("rank", "alpha")} == {k: plain_meta[k] for k in ("rank", "alpha")}
    assert any(not torch.equal(state[k], plain_state[k]) for k in state if "lora_B" in k)  # it trained


def test_int8_with_the_default_fsdp2_trains_on_one_process(tiny_model_dir, square_dataset, tmp_path, runs):
    """The seed's recipe (int8-quanto, distributed left at fsdp2) on one GPU: nothing to shard, it runs as 'none'."""
    out = tmp_path / "int8_fsdp2"
    proc = runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, **COMMON, distributed="fsdp2",
                                       base_model_precision="int8-quanto", base_model_default_dtype="fp32",
                                       quantize_via="cpu"))
    losses = runs.step_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1)) and all(math.isfinite(v) for v in losses.values())
    assert "nothing to shard" in proc.stderr + proc.stdout


@pytest.mark.slow  # about 20 s of torchrun start-up on 2 busy cores
def test_int8_base_with_ddp_on_two_processes(tiny_model_dir, square_dataset, tmp_path, runs):
    out = tmp_path / "int8_ddp"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, **{**COMMON, "max_train_steps": 2},
                                distributed="ddp", base_model_precision="int8-quanto",
                                base_model_default_dtype="fp32"), nproc=2)
    losses = runs.step_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
    state, _ = _lora(out)
    assert state and all(k.startswith("diffusion_model.") for k in state)


def test_group_offload_run_equals_the_plain_run(tiny_model_dir, square_dataset, plain_run, tmp_path, runs):
    """Offload of the transformer blocks, the text encoder and the VAE, and the validation VAE kept on the CPU
    between uses (offload_during_startup): the same losses and LoRA as without, plus a validation image."""
    out = tmp_path / "offload"
    runs.launch(runs.run_config(
        tiny_model_dir, square_dataset, out, **COMMON, enable_group_offload=True,
        group_offload_type="block_level", group_offload_blocks_per_group=2, group_offload_text_encoder=True,
        group_offload_vae=True, offload_during_startup=True,
        validation_prompt="a red square on a white background", validation_resolution="32",
        validation_num_inference_steps=2))
    losses, plain_losses = runs.step_losses(out), runs.step_losses(plain_run)
    assert sorted(losses) == sorted(plain_losses)
    for step, loss in losses.items():
        assert loss == pytest.approx(plain_losses[step], rel=0, abs=1e-7), (step, losses, plain_losses)
    state, _ = _lora(out)
    plain_state, _ = _lora(plain_run)
    assert set(state) == set(plain_state)
    for key in state:
        torch.testing.assert_close(state[key], plain_state[key], rtol=0, atol=1e-7)
    assert len(list((out / "validation").glob("*.png"))) == 1


@pytest.mark.slow  # about 20 s of torchrun start-up on 2 busy cores
def test_group_offload_with_ddp_on_two_processes(tiny_model_dir, square_dataset, tmp_path, runs):
    out = tmp_path / "offload_ddp"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, **{**COMMON, "max_train_steps": 2},
                                distributed="ddp", enable_group_offload=True), nproc=2)
    losses = runs.step_losses(out)
    assert sorted(losses) == [1, 2] and all(math.isfinite(v) for v in losses.values())
