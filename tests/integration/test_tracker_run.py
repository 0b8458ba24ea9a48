"""report_to tensorboard in a real run: `python -m trainer train` on the tiny model, read back from the event files."""

from __future__ import annotations

import pytest


def test_a_run_with_report_to_tensorboard_logs_every_step_and_the_validation_image(tiny_model_dir, square_dataset,
                                                                                   tmp_path, runs):
    """A run of 3 steps (checkpoint at 2), then a resumed run to 4: TensorBoard shows each step once, as last logged."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from flux2_lora_pack.trainer.events import read_events

    out = tmp_path / "tb"
    common = dict(report_to="tensorboard", tracker_run_name="tiny", validation_prompt="a red square",
                  validation_resolution="32", validation_num_inference_steps=2, checkpointing_steps=2)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=3, **common))
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, max_train_steps=4, resume_from_checkpoint="latest",
                                **common))
    events = read_events(out / "events.jsonl")
    assert [e["step"] for e in events if e["event"] == "step"] == [1, 2, 3, 3, 4]  # the second run resumed at 2
    steps = {e["step"]: e for e in events if e["event"] == "step"}  # the last one logged for each step
    tb = EventAccumulator(str(out / "logs" / "tiny"), size_guidance={"scalars": 0, "images": 0})
    tb.Reload()
    for field, tag in {"loss": "train_loss", "lr": "learning_rate", "grad_norm": "grad_norm",
                       "seconds_per_step": "seconds_per_step", "samples_per_second": "samples_per_second",
                       "peak_memory_mb": "peak_memory_mb"}.items():
        logged = tb.Scalars(tag)
        assert [e.step for e in logged] == [1, 2, 3, 4], tag
        assert [e.value for e in logged] == pytest.approx([steps[s][field] for s in range(1, 5)], rel=1e-6), tag
    # Validation renders after each run's last step; the first run's step-3 image is purged with its step 3.
    assert [(i.step, i.width, i.height) for i in tb.Images("validation/validation_prompt")] == [(4, 32, 32)]
