"""The peak-memory estimate: exact parameter counts, its activation coefficients re-measured with autograd's
saved-tensor hooks, and its activation + optimizer term against measured CPU peak RSS of a training step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flux2_lora_pack.trainer import flux2
from flux2_lora_pack.trainer.memory import (
    ACTIVATIONS_DOUBLE,
    ACTIVATIONS_SINGLE,
    FLUX2_DEV_TRANSFORMER_CONFIG,
    GB,
    count_transformer,
    estimate_for_config,
    estimate_peak_memory,
)
from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]
RSS_FACTOR = 1.5
"""The measured increase of peak RSS over a training step is within this factor of the estimated activations
+ gradients + AdamW state (measured here: 0.75 to 1.06 of the estimate)."""


def test_counts_are_exact_on_the_tiny_model():
    from diffusers import Flux2Transformer2DModel

    from flux2_lora_pack.trainer.lora import apply_lora

    counts = count_transformer(TRANSFORMER_CONFIG, lora_rank=4, lora_target="all")
    model = Flux2Transformer2DModel(**TRANSFORMER_CONFIG)
    assert counts.total == sum(p.numel() for p in model.parameters())
    apply_lora(model, preset="all", rank=4, alpha=4)
    assert counts.lora_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (counts.hidden, counts.num_double, counts.num_single) == (256, 2, 3)


def test_flux2_dev_counts():
    counts = count_transformer(FLUX2_DEV_TRANSFORMER_CONFIG, lora_rank=16, lora_target="all")
    assert counts.total == 32_223_281_152 and counts.hidden == 6144
    assert counts.block_linear / counts.total > 0.97  # what int8/int4 quantization converts
    assert (counts.num_double, counts.num_single) == (8, 48)
    assert counts.lora_params == 100_663_296


def _saved_per_block(precision: str) -> tuple[float, float]:
    """Mean saved activations per token per hidden unit of the double and the single blocks (in values)."""
    from diffusers import Flux2Transformer2DModel

    from flux2_lora_pack.trainer.lora import apply_lora

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**TRANSFORMER_CONFIG)
    apply_lora(model, preset="all", rank=4, alpha=4)
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    current: list = [None]
    sizes: dict[int, int] = {}
    seen: set = set()
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i))
        block.register_forward_hook(lambda m, a, o: current.__setitem__(0, None))

    def pack(t):
        storage = t.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if current[0] is not None and key not in seen and not isinstance(t, torch.nn.Parameter):
            seen.add(key)
            sizes[current[0]] = sizes.get(current[0], 0) + storage.nbytes()
        return t

    batch, h, w, text = 1, 4, 4, 512
    value_bytes = 2 if precision == "bf16" else 4
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        model(hidden_states=torch.randn(batch, h * w, 128), encoder_hidden_states=torch.randn(batch, text, 96),
              timestep=torch.full((batch,), 0.5), guidance=torch.ones(batch),
              img_ids=flux2.image_position_ids(batch, h, w), txt_ids=flux2.text_position_ids(batch, text))
    unit = batch * (h * w + text) * 256 * value_bytes
    double = [sizes[i] / unit for i in range(2)]
    single = [sizes[i] / unit for i in range(2, 5)]
    return sum(double) / len(double), sum(single) / len(single)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activation_coefficients_match_what_autograd_saves(precision):
    double, single = _saved_per_block(precision)
    assert double == pytest.approx(ACTIVATIONS_DOUBLE[precision], rel=0.15)
    assert single == pytest.approx(ACTIVATIONS_SINGLE[precision], rel=0.15)


_CHILD = r"""
import json, sys, torch
import conftest  # registers the pack as flux2_lora_pack, as in every test
from flux2_lora_pack.trainer.config import LoraConfig, MemoryConfig, ParallelismConfig
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.parallelize import DistEnv
from flux2_lora_pack.trainer import flux2
args = json.loads(sys.argv[1])
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
lora = LoraConfig(rank=16, alpha=16.0, dropout=args["dropout"], init="default", target="all")
model = build_model(inspect_model_folder(args["model"]), lora=lora,
                    memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=args["checkpointing"]),
                    parallelism=ParallelismConfig(distributed="none"), seed=0, env=env)
optimizer = torch.optim.AdamW([p for p in model.module.parameters() if p.requires_grad], lr=1e-4)
b, side = args["batch"], args["res"] // 16
inputs = dict(hidden_states=torch.randn(b, side * side, 128), encoder_hidden_states=torch.randn(b, 512, 96),
              timestep=torch.full((b,), 0.5), guidance=torch.ones(b), img_ids=flux2.image_position_ids(b, side, side),
              txt_ids=flux2.text_position_ids(b, 512), return_dict=False)
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
model.module(**inputs)[0].pow(2).mean().backward()
optimizer.step()
print(json.dumps({"step_peak_increase": status("VmHWM:") - before}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset peak RSS")
@pytest.mark.parametrize("res, batch, checkpointing, dropout", [(256, 2, False, 0.0), (512, 2, True, 0.1)])
def test_estimate_tracks_measured_peak_rss_of_a_cpu_step(tiny_model_dir, res, batch, checkpointing, dropout):
    args = {"model": str(tiny_model_dir), "res": res, "batch": batch, "checkpointing": checkpointing,
            "dropout": dropout}
    # glibc keeps freed blocks below its (adaptive) mmap threshold in the heap, so RSS would not fall when
    # tensors are freed; a fixed 64 KiB threshold makes every tensor its own mapping and RSS follow live memory.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])["step_peak_increase"]
    estimate = estimate_peak_memory(TRANSFORMER_CONFIG, mixed_precision="no", lora_rank=16, lora_dropout=dropout,
                                    batch_size=batch, resolution=(res, res), gradient_checkpointing=checkpointing,
                                    device="cpu")
    # The LoRA weights exist before the step; the step adds gradients and AdamW's two moments (12 of 16 bytes).
    expected = (estimate.activations_gb + estimate.lora_gb * 12 / 16) * GB
    assert 1 / RSS_FACTOR <= measured / expected <= RSS_FACTOR, (measured / 2**20, expected / 2**20)


def test_each_memory_feature_lowers_the_estimate_it_should():
    dev = FLUX2_DEV_TRANSFORMER_CONFIG
    base = estimate_peak_memory(dev)
    int8 = estimate_peak_memory(dev, base_model_precision="int8-quanto")
    int4 = estimate_peak_memory(dev, base_model_precision="int4-quanto")
    assert int4.weights_gb < int8.weights_gb < base.weights_gb
    assert 0.45 < int8.weights_gb / base.weights_gb < 0.55
    no_ckpt = estimate_peak_memory(dev, gradient_checkpointing=False)
    assert no_ckpt.activations_gb > 10 * base.activations_gb
    fsdp = estimate_peak_memory(dev, distributed="fsdp2", world_size=8)
    assert fsdp.weights_gb < base.weights_gb / 2 and fsdp.lora_gb == pytest.approx(base.lora_gb / 8)
    ddp = estimate_peak_memory(dev, distributed="ddp", world_size=8)
    assert ddp.weights_gb == base.weights_gb and ddp.lora_gb > base.lora_gb  # replicated, plus DDP's bucket
    offload = estimate_peak_memory(dev, group_offload=True)
    assert offload.weights_gb < 0.1 * base.weights_gb
    assert estimate_peak_memory(dev, lora_dropout=0.1).activations_gb > base.activations_gb
    assert estimate_peak_memory(dev, resolution=(512, 512)).activations_gb < base.activations_gb
    assert base.total_gb == pytest.approx(sum(base.breakdown()[k] for k in
                                              ("weights", "lora_and_optimizer", "activations", "overhead")), abs=0.01)


def test_fits():
    dev = FLUX2_DEV_TRANSFORMER_CONFIG
    assert [estimate_peak_memory(dev).fits(gb) for gb in (24, 48, 80)] == [False, False, True]
    assert [estimate_peak_memory(dev, base_model_precision="int4-quanto").fits(gb) for gb in (24, 48, 80)] == [
        False, True, True]
    assert estimate_peak_memory(dev, group_offload=True, resolution=(512, 512)).fits(24)


def test_estimate_for_config_reads_the_run(tiny_model_dir, tmp_path):
    from flux2_lora_pack.trainer.config import TrainConfig

    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")  # not a built dataset: the estimate falls back to 1024 px
    config = TrainConfig.from_dict({
        "pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
        "dataset_manifest": str(manifest), "distributed": "ddp", "base_model_precision": "int8-quanto",
        "lora_rank": 8, "train_batch_size": 2, "validation_prompt": "a cat"})
    estimate = estimate_for_config(config, world_size=2)
    direct = estimate_peak_memory(TRANSFORMER_CONFIG | {"_class_name": "x"}, base_model_precision="int8-quanto",
                                  lora_rank=8, lora_dropout=0.1, batch_size=2, distributed="ddp", world_size=2)
    assert estimate.lora_gb == direct.lora_gb and estimate.activations_gb == direct.activations_gb
    assert estimate.weights_gb > direct.weights_gb  # plus the validation VAE kept on the device
