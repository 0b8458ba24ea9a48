"""TREAD and gradient checkpointing in real trainer runs: torchrun with 2 CPU processes (gloo, FSDP2)."""

from __future__ import annotations

import math

import pytest

from safetensors import safe_open

# Blocks 1..3 of the tiny model's 5: the last double block and two single blocks (spans the boundary).
TREAD = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]}


@pytest.mark.slow  # about 50 s; tests/unit/test_tread.py holds TREAD with checkpointing equal in one process
def test_tread_with_checkpointing_under_fsdp2_equals_one_process(tiny_model_dir, square_dataset, tmp_path, runs):
    """Routed tokens come from each sample's own generator: 2 FSDP2 ranks x batch 1 route exactly the tokens
    that 1 process x batch 2 routes, so the loss curves agree (as without TREAD, to the order of a float sum);
    the run with TREAD differs from the one without."""
    common = dict(max_train_steps=4, tread_config=TREAD, gradient_checkpointing=True,
                  gradient_checkpointing_interval=2)
    one, two, plain = tmp_path / "one", tmp_path / "two", tmp_path / "plain"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, one, train_batch_size=2, **common), nproc=1)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, two, train_batch_size=1, distributed="fsdp2",
                                **common), nproc=2)
    a, b = runs.step_losses(one), runs.step_losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in a.values())
    assert abs(a[1] - b[1]) < 1e-6
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)
    with safe_open(str(two / "lora.safetensors"), "pt") as fh:
        assert any("lora_" in k for k in fh.keys())  # noqa: SIM118 (safe_open has no __iter__)

    runs.launch(runs.run_config(tiny_model_dir, square_dataset, plain, train_batch_size=2, max_train_steps=1), nproc=1)
    assert abs(runs.step_losses(plain)[1] - a[1]) > 1e-4
