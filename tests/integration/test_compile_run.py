"""dynamo_backend and selective checkpointing in a real trainer run (one CPU process): the same loss curve."""

from __future__ import annotations

import pytest

TREAD = {"routes": [{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]}


@pytest.mark.slow
def test_compiled_blocks_and_saved_attention_give_the_uncompiled_losses(tiny_model_dir, square_dataset, tmp_path, runs):
    """config key -> build_model -> compiled block classes (aot_eager on the CPU) with TREAD, checkpointing every
    other block and attention outputs kept: the loss curve of the eager run without those settings."""
    common = dict(max_train_steps=3, tread_config=TREAD, gradient_checkpointing=True, gradient_checkpointing_interval=2)
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, eager, dynamo_backend="no", **common))
    done = runs.launch(runs.run_config(tiny_model_dir, square_dataset, compiled, dynamo_backend="aot_eager",
                                       gradient_checkpointing_save_attention=True, **common))
    a, b = runs.step_losses(eager), runs.step_losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-5, (a, b)
    assert "compiled with torch.compile backend 'aot_eager'" in done.stdout + done.stderr
