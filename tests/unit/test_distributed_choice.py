"""distributed "auto" (trainer/distributed_choice.py): DDP when the memory model says the model fits each device,
FSDP2 when it must be sharded; explicit values unchanged; the ranks agree."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch

choice_module = importlib.import_module("flux2_lora_pack.trainer.distributed_choice")
memory = importlib.import_module("flux2_lora_pack.trainer.memory")
parallelize = importlib.import_module("flux2_lora_pack.trainer.parallelize")
preflight = importlib.import_module("flux2_lora_pack.trainer.preflight")
from flux2_lora_pack.trainer.config import TrainConfig  # noqa: E402


def make_config(model: Path, tmp_path: Path, **overrides) -> TrainConfig:
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    return TrainConfig.from_dict({"pretrained_model_name_or_path": str(model), "output_dir": str(tmp_path / "out"),
                                  "dataset_manifest": str(manifest), **overrides})


@pytest.fixture
def gpu(monkeypatch):
    """Pretend this process sees a CUDA GPU of the given size (GiB)."""
    def set_size(gb: float | None) -> None:
        monkeypatch.setattr(memory, "accelerator_memory_gb", lambda device_index=0: gb)
    return set_size


def test_auto_is_the_default_and_explicit_values_are_kept(tiny_model_dir, tmp_path, gpu):
    gpu(1.0)  # far too small for anything: an explicit value must still be returned as it is
    assert make_config(tiny_model_dir, tmp_path).parallelism.distributed == "auto"
    for mode in ("fsdp2", "ddp", "none"):
        choice = choice_module.choose_distributed(make_config(tiny_model_dir, tmp_path, distributed=mode), world_size=4)
        assert (choice.mode, choice.reason) == (mode, "set in the config")


def test_one_process_runs_unwrapped(tiny_model_dir, tmp_path, gpu):
    gpu(80.0)
    assert choice_module.choose_distributed(make_config(tiny_model_dir, tmp_path), world_size=1).mode == "none"


def test_ddp_when_the_estimate_fits_the_gpu_and_fsdp2_when_it_does_not(tiny_model_dir, tmp_path, gpu):
    config = make_config(tiny_model_dir, tmp_path)
    need = memory.estimate_for_config(choice_module.with_distributed(config, "ddp"), world_size=2).total_gb
    gpu(need / choice_module.FIT_MARGIN * 1.01)  # just enough room with the margin
    fits = choice_module.choose_distributed(config, world_size=2)
    assert fits.mode == "ddp" and "fits each GPU" in fits.reason and f"{need:.1f} GB" in fits.reason
    gpu(need / choice_module.FIT_MARGIN * 0.99)  # just too little
    tight = choice_module.choose_distributed(config, world_size=2)
    assert tight.mode == "fsdp2" and "FSDP2 shards" in tight.reason and "90%" in tight.reason


def test_the_real_flux2_dev_needs_fsdp2_on_an_80_gb_gpu_and_fits_a_141_gb_one(tmp_path, gpu):
    """With FLUX.2-dev's real transformer config (bf16, 32B: 64 GB of weights) DDP does not fit an 80 GB H100 but
    fits an H200; the estimate needs only the config (nothing is loaded)."""
    model = tmp_path / "FLUX.2-dev"
    (model / "transformer").mkdir(parents=True)
    (model / "transformer" / "config.json").write_text(json.dumps(memory.FLUX2_DEV_TRANSFORMER_CONFIG))
    config = make_config(model, tmp_path, gradient_checkpointing=True, train_batch_size=1)
    gpu(80.0)
    assert choice_module.choose_distributed(config, world_size=8).mode == "fsdp2"
    gpu(141.0)
    assert choice_module.choose_distributed(config, world_size=8).mode == "ddp"


@pytest.mark.parametrize("settings, why", [
    ({"base_model_precision": "int8-quanto"}, "int weights that FSDP2 cannot shard"),
    ({"enable_group_offload": True, "gradient_checkpointing": True}, "group_offload"),
])
def test_settings_fsdp2_cannot_shard_pick_ddp(tiny_model_dir, tmp_path, gpu, settings, why):
    gpu(1e-6)  # even when the estimate would not fit: FSDP2 cannot run these at all
    choice = choice_module.choose_distributed(make_config(tiny_model_dir, tmp_path, **settings), world_size=2)
    assert choice.mode == "ddp" and why in choice.reason


def test_on_the_cpu_the_processes_share_the_host_ram(tiny_model_dir, tmp_path, gpu, monkeypatch):
    gpu(None)
    config = make_config(tiny_model_dir, tmp_path)
    monkeypatch.setattr(memory, "available_host_memory_gb", lambda: 1000.0)
    assert choice_module.choose_distributed(config, world_size=2).mode == "ddp"
    monkeypatch.setattr(memory, "available_host_memory_gb", lambda: 0.01)
    tight = choice_module.choose_distributed(config, world_size=2)
    assert tight.mode == "fsdp2" and "host RAM for 2 processes" in tight.reason


def test_the_ranks_agree_on_fsdp2_when_any_rank_cannot_hold_the_model(tiny_model_dir, tmp_path, gpu, monkeypatch):
    gpu(None)
    monkeypatch.setattr(memory, "available_host_memory_gb", lambda: 1000.0)
    env = parallelize.DistEnv(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    config = make_config(tiny_model_dir, tmp_path)
    monkeypatch.setattr(parallelize, "all_reduce_min", lambda value, env: value)  # the other rank also chose DDP
    resolved, choice = choice_module.resolve_distributed(config, env=env)
    assert resolved.parallelism.distributed == choice.mode == "ddp"
    monkeypatch.setattr(parallelize, "all_reduce_min", lambda value, env: torch.zeros_like(value))  # it did not
    resolved, choice = choice_module.resolve_distributed(config, env=env)
    assert resolved.parallelism.distributed == "fsdp2" and "another rank" in choice.reason


def test_the_preflight_shows_the_choice_and_its_reason(tiny_model_dir, tmp_path, gpu, monkeypatch):
    gpu(None)
    throughput = importlib.import_module("flux2_lora_pack.trainer.throughput")
    monkeypatch.setattr(throughput, "dataset_samples", lambda paths: [])  # no built dataset here: no time figure
    monkeypatch.setattr(memory, "available_host_memory_gb", lambda: 1000.0)
    checked = preflight.run_preflight(make_config(tiny_model_dir, tmp_path), num_processes=2, enforce=False)
    assert checked.distributed_mode == "ddp"
    assert checked.lines()[-1].startswith("distributed 'ddp': the model fits host RAM 2 times over")
    assert checked.as_dict()["distributed"] == checked.lines()[-1]
    explicit = preflight.run_preflight(make_config(tiny_model_dir, tmp_path, distributed="fsdp2"), num_processes=2,
                                       enforce=False)
    assert explicit.distributed_mode == "fsdp2" and explicit.distributed is None and len(explicit.lines()) == 2
