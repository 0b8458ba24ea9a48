"""The new optimizers and the LoRA EMA through the real trainer (python -m trainer / torchrun, gloo): build, step,
checkpoint, resume, validation images of both weights, and the <output_name>_ema.safetensors beside the LoRA."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as fh:
        return {k: fh.get_tensor(k) for k in fh.keys()}


@pytest.mark.slow  # ~60 s: three torchrun launches; FSDP2 equality is also unit-tested in test_optimizers_fsdp2.py
def test_fsdp2_adamw_bf16_with_ema_resumes_exactly(tiny_model_dir, square_dataset, tmp_path, runs):
    straight, split = tmp_path / "straight", tmp_path / "split"
    # constant_with_warmup: the split run's shorter max_train_steps leaves its learning rates as they are
    common = dict(distributed="fsdp2", optimizer="adamw_bf16", use_ema=True, ema_decay=0.9, checkpointing_steps=2,
                  lr_scheduler="constant_with_warmup", lr_warmup_steps=2, max_train_steps=4)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, straight, **common), nproc=2)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, split, **{**common, "max_train_steps": 2}), nproc=2)
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, split, **common, resume_from_checkpoint="latest"),
                nproc=2)
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a, b = _tensors(straight / name), _tensors(split / name)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=0)
    lora, ema = _tensors(straight / "lora.safetensors"), _tensors(straight / "lora_ema.safetensors")
    assert {v.dtype for k, v in lora.items() if "lora_" in k} == {torch.bfloat16}  # adamw_bf16 trains bf16 weights
    assert {v.dtype for k, v in ema.items() if "lora_" in k} == {torch.float32}  # the average is kept in fp32
    assert any(not torch.equal(lora[k].float(), ema[k]) for k in lora if "lora_B" in k)


@pytest.mark.slow  # ~70 s; prodigy's update and schedule-free swap are unit-tested in test_optimizers.py
def test_prodigy_renders_validation_with_trained_and_ema_weights(tiny_model_dir, square_dataset, tmp_path, runs):
    pytest.importorskip("prodigyplus", reason="prodigy needs prodigy-plus-schedule-free (requirements-test.txt)")
    out = tmp_path / "prodigy"
    runs.launch(runs.run_config(tiny_model_dir, square_dataset, out, optimizer="prodigy", use_ema=True,
                                optimizer_config="d0=1e-3", max_train_steps=3, validation_steps=3,
                                lr_scheduler="polynomial", lr_warmup_steps=1, lr_end=0.1, lr_power=2.0,
                                validation_prompt="a red square", validation_resolution="32",
                                validation_num_inference_steps=1))
    from flux2_lora_pack.trainer.events import read_events

    images = [i for e in read_events(out / "events.jsonl") if e["event"] == "validation" for i in e["images"]]
    assert sorted(p.name for p in (out / "validation").glob("*.png")) == [
        "step000003_validation_prompt.png", "step000003_validation_prompt_ema.png"]
    assert [i.get("variant") for i in images] == [None, "ema"]
    assert (out / "lora.safetensors").is_file() and (out / "lora_ema.safetensors").is_file()
    step_lrs = [e["lr"] for e in read_events(out / "events.jsonl") if e["event"] == "step"]
    # prodigy's own multiplier 1.0 under the polynomial schedule: warm-up, then 0.1 + 0.9 * (1 - progress) ** 2
    assert step_lrs == pytest.approx([1.0, 1.0, 0.1 + 0.9 * 0.5 ** 2])
