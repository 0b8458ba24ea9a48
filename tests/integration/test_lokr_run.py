"""A LyCORIS LoKr run as users start it (lora_type "lycoris" with SimpleTuner's lycoris_config): 2 CPU processes
with the shared q/k/v w2 and init_lokr_norm, FSDP2 to a checkpoint and DDP resuming it, against one process."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

# SimpleTuner's FLUX.2 LoKr recipe (documentation/LYCORIS.md): full factors, per-class factors, bypass_mode.
LYCORIS = {
    "bypass_mode": True, "algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_dim": 10000,
    "linear_alpha": 1, "factor": 4,
    "apply_preset": {
        "target_module": ["Flux2Attention", "Flux2FeedForward", "Flux2ParallelSelfAttention"],
        "module_algo_map": {"Flux2FeedForward": {"factor": 4}, "Flux2Attention": {"factor": 2},
                            "Flux2ParallelSelfAttention": {"factor": 2}},
    },
}


@pytest.mark.slow  # ~100 s on 2 cores: three torchrun launches; LoKr's numerics are unit-tested in test_lokr.py
def test_lokr_fsdp2_resumed_run_equals_one_process_and_saves_comfyui_lokr_keys(tiny_model_dir, square_dataset,
                                                                               tmp_path, runs):
    config = tmp_path / "lycoris_config.json"
    config.write_text(json.dumps(LYCORIS))
    lokr = dict(lora_type="lycoris", lycoris_config=str(config), init_lokr_norm=1e-3, learning_rate=1e-2,
                checkpointing_steps=3, lr_scheduler="constant")
    one, two = tmp_path / "one", tmp_path / "two"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, one, train_batch_size=2, max_train_steps=6, **lokr))
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, two, max_train_steps=3, train_batch_size=1,
                                distributed="fsdp2", **lokr), nproc=2)
    assert {p.name for p in two.glob("checkpoint-*")} == {"checkpoint-3"}
    with safe_open(str(two / "checkpoint-3" / "lora.safetensors"), "pt") as fh:  # the step's LoKr, for LoRA Grid
        assert json.loads(fh.metadata()["steps"]) == 3 and all(".lokr_w" in k for k in fh.keys())
    # A checkpoint holds the whole adapter and optimizer state, so DDP resumes what FSDP2 saved.
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, two, max_train_steps=6, train_batch_size=1,
                                distributed="ddp", resume_from_checkpoint="latest", **lokr), nproc=2)
    a, b = runs.step_losses(one), runs.step_losses(two)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    # Same samples and noise (1 x batch 2 == 2 x batch 1); the resumed half continues the same curve.
    assert max(abs(a[s] - b[s]) for s in a) < 1e-4, (a, b)

    with safe_open(str(one / "lora.safetensors"), "pt") as fa, safe_open(str(two / "lora.safetensors"), "pt") as fb:
        keys, meta = set(fa.keys()), fa.metadata()
        assert keys == set(fb.keys())
        for key in keys:
            torch.testing.assert_close(fa.get_tensor(key), fb.get_tensor(key), rtol=0, atol=1e-4)
        qkv_w1 = fa.get_tensor("diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1")
        w2 = fa.get_tensor("diffusion_model.single_blocks.0.linear1.lokr_w2")
    # ComfyUI's LoKr names on BFL modules, full factors (no alpha: ComfyUI's scale is 1), q/k/v fused.
    modules = {k.rsplit(".", 1)[0] for k in keys}
    assert keys == {f"{m}.{s}" for m in modules for s in ("lokr_w1", "lokr_w2")}
    assert len(modules) == 2 * 8 + 3 * 2 and all(m.startswith("diffusion_model.") for m in modules)
    assert qkv_w1.shape == (3 * 2, 2)  # Flux2Attention factor 2: each of q, k, v has a 2 x 2 w1
    # init_lokr_norm started w1 at 1 and w2 near 1e-3 x the base weight's scale; six steps moved both.
    assert 0 < (qkv_w1 - 1).abs().max() < 0.5 and w2.abs().max() > 0
    assert json.loads(meta["adapter_type"]) == "lokr" and json.loads(meta["lycoris_config"]) == LYCORIS
    assert json.loads(meta["rank"]) == 10000 and json.loads(meta["alpha"]) == 1.0
    assert json.loads(meta["targets"]) == "Flux2Attention,Flux2FeedForward,Flux2ParallelSelfAttention"
