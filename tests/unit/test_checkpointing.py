"""trainer/checkpointing.py: the memory model picks the checkpoint interval; selective checkpointing keeps attention.

Every mode must give the loss and LoRA gradients of no checkpointing: checkpointing only changes what is kept.
"""

from __future__ import annotations

import pytest
import torch
from block_tools import tiny_inputs, tiny_transformer, with_block_forward
from flux2_lora_pack.trainer import checkpointing, memory, tread

SPANNING = tread.Route(start=1, end=3, selection_ratio=0.5)  # crosses the double/single boundary of the tiny model


def _loss_and_grads(reference_timestep: str = "shared", **settings) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model = with_block_forward(tiny_transformer().train(), **settings)
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = model(**tiny_inputs(), return_dict=False, num_target_tokens=16, reference_timestep=reference_timestep,
                **({"tread_generators": gens} if settings.get("routes") else {}))[0]
    loss = out.square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("settings", [
    {"checkpoint_every": 1, "save_attention": True},
    {"checkpoint_every": 2, "save_attention": True},
    {"checkpoint_every": 3},
    {"checkpoint_every": 1, "save_attention": True, "routes": (SPANNING,)},
    {"checkpoint_every": 1, "save_attention": True, "reference_timestep": "zero"},
], ids=["every-block-save-attention", "interval-2-save-attention", "interval-3", "save-attention-tread",
        "save-attention-zero-reference-timestep"])
def test_checkpoint_modes_give_the_loss_and_grads_of_no_checkpointing(settings):
    routes = settings.get("routes", ())
    loss_a, grads_a = _loss_and_grads(routes=routes, reference_timestep=settings.get("reference_timestep", "shared"))
    loss_b, grads_b = _loss_and_grads(**settings)
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-6)
    assert set(grads_b) == set(grads_a) and all(g is not None for g in grads_b.values())
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6, msg=name)


def test_save_attention_keeps_only_attention_outputs():
    """The policy saves the attention kernels' outputs and recomputes every other op (matmuls included)."""
    from torch.utils.checkpoint import CheckpointPolicy

    aten = torch.ops.aten
    policy = checkpointing._save_attention_policy
    assert policy(None, aten._scaled_dot_product_flash_attention_for_cpu.default) == CheckpointPolicy.MUST_SAVE
    assert policy(None, aten._scaled_dot_product_efficient_attention.default) == CheckpointPolicy.MUST_SAVE
    assert policy(None, aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, aten.mul.Tensor) == CheckpointPolicy.PREFER_RECOMPUTE


def _fake_estimate(num_blocks: int, *, fixed: float, per_block: float):
    """A peak that grows by per_block GB for each block that is not checkpointed."""
    return lambda interval: fixed + per_block * (num_blocks - checkpointing.checkpointed_blocks(num_blocks, interval))


@pytest.mark.parametrize(("device_gb", "interval", "fits"), [
    (200.0, None, True),  # 34 GB without checkpointing fits 180: no recompute at all
    (36.0, 8, True),      # budget 32.4: checkpointing block 0 only (31) fits
    (30.0, 3, True),      # budget 27: blocks 0, 3, 6 (25); interval 4 (28) does not
    (12.0, 1, True),      # budget 10.8: only every block (10)
    (10.0, 1, False),     # nothing fits: every block, reported as not fitting
])
def test_auto_interval_picks_the_least_recompute_that_fits(device_gb, interval, fits):
    estimate = _fake_estimate(8, fixed=10.0, per_block=3.0)
    choice = checkpointing.choose_interval(estimate, num_blocks=8, device_gb=device_gb)
    budget = device_gb * checkpointing.AUTO_HEADROOM
    assert choice.fits is fits and choice.budget_gb == pytest.approx(budget)
    if fits:  # the choice fits, and no choice with fewer checkpointed blocks does
        assert estimate(choice.interval) <= budget
        fewer = [i for i in [None, *range(8, 0, -1)] if checkpointing.checkpointed_blocks(8, i)
                 < checkpointing.checkpointed_blocks(8, choice.interval)]
        assert all(estimate(i) > budget for i in fewer)
    else:
        assert "even checkpointing every block" in choice.reason
    assert choice.interval == interval


def test_auto_interval_on_flux2_dev_at_1024px():
    """The real memory model on FLUX.2-dev (bf16, batch 1, 1024 px): an H200 keeps every other block, a 80 GB GPU
    must checkpoint them all (and is told it is short), a 256 GB device needs none."""
    def estimate(interval):
        return memory.estimate_peak_memory(memory.FLUX2_DEV_TRANSFORMER_CONFIG, gradient_checkpointing=interval is not None,
                                           gradient_checkpointing_interval=interval).total_gb

    h200 = checkpointing.choose_interval(estimate, num_blocks=56, device_gb=141.0)
    assert (h200.interval, h200.fits) == (2, True)
    assert "gradient_checkpointing_interval 2" in h200.reason
    small = checkpointing.choose_interval(estimate, num_blocks=56, device_gb=80.0)
    assert (small.interval, small.fits) == (1, False)
    big = checkpointing.choose_interval(estimate, num_blocks=56, device_gb=256.0)
    assert (big.interval, big.fits) == (None, True) and big.reason.startswith("no gradient checkpointing")


def test_estimate_counts_checkpointed_blocks_and_saved_attention():
    config = memory.FLUX2_DEV_TRANSFORMER_CONFIG
    every = memory.estimate_peak_memory(config, gradient_checkpointing=True).activations_gb
    assert memory.estimate_peak_memory(config, gradient_checkpointing=True,
                                       gradient_checkpointing_interval=1).activations_gb == every
    half = memory.estimate_peak_memory(config, gradient_checkpointing=True, gradient_checkpointing_interval=2)
    none = memory.estimate_peak_memory(config, gradient_checkpointing=False)
    assert every < half.activations_gb < none.activations_gb
    saved = memory.estimate_peak_memory(config, gradient_checkpointing=True, save_attention=True).activations_gb
    unit = 1 * (4096 + 512) * 6144 * 2 / memory.GB  # one bf16 value per token and hidden unit
    assert saved - every == pytest.approx(56 * memory.SAVED_ATTENTION * unit)


def test_resolve_memory_writes_the_choice_into_the_memory_settings(tiny_model_dir, monkeypatch, caplog):
    """The run builds its model with the interval the estimate chose for the device's memory (here a given figure;
    the tiny model has 5 blocks); without CUDA nothing changes."""
    import dataclasses
    from types import SimpleNamespace

    from flux2_lora_pack.trainer.config import MemoryConfig
    from flux2_lora_pack.trainer.parallelize import DistEnv

    def fake_estimate(config, *, world_size, gradient_checkpointing, gradient_checkpointing_interval):
        kept = 5 - checkpointing.checkpointed_blocks(5, gradient_checkpointing_interval)
        return SimpleNamespace(total_gb=10.0 + 4.0 * kept)

    monkeypatch.setattr(memory, "estimate_for_config", fake_estimate)
    auto = MemoryConfig(checkpointing=checkpointing.SelectiveCheckpointConfig(auto_interval=True))
    config = SimpleNamespace(memory=auto, model=SimpleNamespace(root=tiny_model_dir))
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with caplog.at_level("INFO", logger="flux2_lora_pack.trainer.checkpointing"):
        # budget 22.5: checkpointing 2 of the 5 blocks (interval 4: blocks 0 and 4) keeps 3: 10 + 4 x 3 = 22
        chosen = checkpointing.resolve_memory(config, env=env, device_gb=25.0)
    assert chosen == dataclasses.replace(auto, gradient_checkpointing=True, gradient_checkpointing_interval=4)
    assert chosen.checkpoint_every == 4 and "gradient_checkpointing_interval 4" in caplog.text
    everything = checkpointing.resolve_memory(config, env=env, device_gb=40.0)  # 30 fits 36: no checkpointing
    assert not everything.gradient_checkpointing and everything.checkpoint_every is None
    assert checkpointing.resolve_memory(config, env=env) is auto  # CPU: no device memory to fit
    off = SimpleNamespace(memory=MemoryConfig(), model=config.model)
    assert checkpointing.resolve_memory(off, env=env, device_gb=1.0) is off.memory  # not asked for
