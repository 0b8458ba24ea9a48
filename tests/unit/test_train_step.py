"""One optimizer step (trainer.loop.train_step) on the tiny FLUX.2: gradient accumulation equals the larger batch,
and max_grad_norm clips the step's gradient to that norm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from flux2_lora_pack.trainer.config import LoraConfig, MemoryConfig, ObjectiveConfig, OptimizerConfig, ParallelismConfig
from flux2_lora_pack.trainer.loop import build_optimizer, train_step
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.parallelize import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
ACCUMULATION_TOLERANCE = 1e-5
"""Largest gradient difference, relative to the largest gradient, between 2 micro-batches of 1 and 1 batch of 2:
the same samples, noise and timesteps (drawn per sample index), summed in another order in fp32."""


def _model(folder):
    model = build_model(inspect_model_folder(folder), lora=LoraConfig(rank=4, alpha=4.0, dropout=0.0, init="default",
                                                                        target="all"),
                        memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=False),
                        parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU)
    with torch.no_grad():  # lora_B starts at zero, which leaves lora_A without gradient: give it values
        for name, param in model.inner.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model


def _batch(latents: torch.Tensor, embeds: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(latents=latents, prompt_embeds=embeds, reference_latents=None,
                           image_paths=tuple(f"img{i}.png" for i in range(len(latents))))


def _gradients_of_one_step(model, micro_batches, *, max_grad_norm: float) -> dict[str, torch.Tensor]:
    """The LoRA gradients train_step hands the optimizer (captured at optimizer.step, after clipping)."""
    optimizer = build_optimizer(model, optim=OptimizerConfig(max_grad_norm=max_grad_norm))
    captured: dict[str, torch.Tensor] = {}

    def step():
        captured.update({n: p.grad.detach().clone() for n, p in model.inner.named_parameters() if p.grad is not None})

    optimizer.step = step
    applied = train_step(model, optimizer, micro_batches=micro_batches, objective=ObjectiveConfig(),
                         empty_embeds=None, seed=7, step=3, env=CPU, max_grad_norm=max_grad_norm,
                         nan_policy="stop").applied
    assert applied and captured
    return captured


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 128, 2, 2, generator=g), torch.randn(2, 8, 96, generator=g)


def test_two_micro_batches_of_one_equal_one_batch_of_two(tiny_model_dir, samples):
    latents, embeds = samples
    model = _model(tiny_model_dir)
    accumulated = _gradients_of_one_step(model, [_batch(latents[:1], embeds[:1]), _batch(latents[1:], embeds[1:])],
                                         max_grad_norm=0.0)
    together = _gradients_of_one_step(model, [_batch(latents, embeds)], max_grad_norm=0.0)
    assert accumulated.keys() == together.keys() and len(together) == 2 * 30  # lora_A and lora_B of 30 Linears
    scale = max(float(g.abs().max()) for g in together.values())
    worst = max(float((accumulated[n] - together[n]).abs().max()) for n in together)
    assert scale > 0 and worst <= ACCUMULATION_TOLERANCE * scale
    # and accumulation really sums two halves: one micro-batch alone is another gradient
    alone = _gradients_of_one_step(model, [_batch(latents[:1], embeds[:1])], max_grad_norm=0.0)
    assert max(float((alone[n] - together[n]).abs().max()) for n in together) > 100 * ACCUMULATION_TOLERANCE * scale


def test_max_grad_norm_scales_a_larger_gradient_to_that_norm(tiny_model_dir, samples):
    latents, embeds = samples
    model = _model(tiny_model_dir)
    batch = [_batch(latents, embeds)]
    free = _gradients_of_one_step(model, batch, max_grad_norm=0.0)  # 0 turns clipping off
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in free.values()])))
    limit = norm / 4
    clipped = _gradients_of_one_step(model, batch, max_grad_norm=limit)
    clipped_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in clipped.values()])))
    assert clipped_norm == pytest.approx(limit, rel=1e-4)
    for name, grad in free.items():  # the same direction, scaled
        torch.testing.assert_close(clipped[name], grad * (limit / norm), rtol=1e-4, atol=1e-9)
    # a limit above the norm leaves the gradient as it is
    loose = _gradients_of_one_step(model, batch, max_grad_norm=norm * 2)
    assert all(torch.equal(loose[n], free[n]) for n in free)
