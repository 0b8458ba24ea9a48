"""Scheduled sampling as users run it: FSDP2 over 2 CPU processes (gloo), where the ranks roll out different
lengths (one none at all) in the same step, and a resumed run that continues the same curve
(that the rollout changes training at all: tests/unit/test_scheduled_sampling.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from flux2_lora_pack.trainer.objective import sample_generators
from flux2_lora_pack.trainer.scheduled_sampling import ScheduledSamplingConfig

SETTINGS = dict(scheduled_sampling_max_step_offset=3, scheduled_sampling_probability=0.5,
                scheduled_sampling_sampler="heun")


@pytest.mark.slow  # ~70 s on 2 cores: three FSDP2 launches; the rollout itself is unit-tested in test_scheduled_sampling.py
def test_fsdp2_ranks_with_different_rollouts_stay_in_step_and_resume_is_exact(tiny_model_dir, square_dataset,
                                                                              tmp_path, runs):
    plan = ScheduledSamplingConfig(max_step_offset=3, probability=0.5)
    seed, steps = 1, 4
    # rank r's sample at step s is global index r (batch 1): the offsets each rank draws
    offsets = [[plan.draw_offsets(sample_generators(seed=seed, step=s, first_index=r, count=1), step=s)[0]
                for r in (0, 1)] for s in range(steps)]
    assert any(min(k) == 0 < max(k) for k in offsets), offsets  # one rank idles while the other rolls out

    straight, split = tmp_path / "straight", tmp_path / "split"
    common = dict(distributed="fsdp2", max_train_steps=steps, checkpointing_steps=2, seed=seed,
                  collective_timeout_s=120, **SETTINGS)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, straight, **common), nproc=2)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, split, **{**common, "max_train_steps": 2}), nproc=2)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, split, **common, resume_from_checkpoint="latest"),
                nproc=2)
    a, b = runs.step_losses(straight), runs.step_losses(split)
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])
    with safe_open(str(straight / "lora.safetensors"), "pt") as fa, safe_open(str(split / "lora.safetensors"), "pt") as fb:
        for key in fa.keys():
            torch.testing.assert_close(fa.get_tensor(key), fb.get_tensor(key), rtol=0, atol=1e-6)

