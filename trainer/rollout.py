"""The scheduled-sampling rollout: the model's own few-step walk to a sample's training timestep, without gradients.

For each sample the plan (trainer/scheduled_sampling.py) rolls out k > 0 steps: it starts on the noising path at
s_src = min(s + k/1000, 1) (x_src = x_t + (s_src - s)(e - x0), the same clean latent and noise), and solves
dx/ds = v(x, s) with the model's velocity from s_src down to its training timestep s in k equal steps (Euler, Heun
or RK4). The training step then sees that x in place of x_t; target, timestep, text and references stay.

The rollout runs under no_grad in eval mode: no LoRA dropout, no TREAD routing (blocks.py routes only in training
mode), no checkpointing; gradients flow only through the training forward that follows. Samples with k = 0 are
left alone. With several processes every rank runs the same number of forwards (the largest k over all ranks; a
rank with less to do repeats a zero-length step), so FSDP2's all-gathers stay in step.

ReflexFlow (on by default with scheduled sampling, as in SimpleTuner): two more forwards at the training timestep,
at the plain x_t and at the rolled-out x. Their difference d (the exposure bias) weights each loss element of a
rolled-out sample by beta2 * (1 + alpha * d / sum|d|), and beta1 * |unit(pred) - unit(x - x0)|^2 joins its loss
(objective.flow_matching_loss). Unlike SimpleTuner, which applies beta1 and beta2 to every sample once scheduled
sampling is on, both act on the rolled-out samples only: the others keep the plain objective, so probability 0 is
the plain objective exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import parallelize
from .objective import PreparedBatch, model_prediction
from .scheduled_sampling import STEPS_PER_UNIT_SIGMA, ScheduledSamplingConfig

if TYPE_CHECKING:
    from .model import Model

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def roll_out(model: Model, prepared: PreparedBatch, *, offsets: list[int], settings: ScheduledSamplingConfig,
             device: torch.device, dtype: torch.dtype, env: parallelize.DistEnv) -> PreparedBatch:
    """prepared with each sample whose offset k > 0 moved to the model's own x at its timestep (see the module)."""
    if len(offsets) != prepared.hidden_states.shape[0]:
        raise ValueError(f"roll_out needs one offset per sample: {len(offsets)} for a batch of "
                         f"{prepared.hidden_states.shape[0]}")
    rows = [i for i, k in enumerate(offsets) if k > 0]
    steps = max((offsets[i] for i in rows), default=0)
    if env.world_size > 1:  # every rank runs as many forwards as the busiest one
        steps = int(parallelize.all_reduce_max(torch.tensor(float(steps)), env))
    if steps == 0:
        return prepared
    busy = bool(rows)
    sub = _select(prepared, rows or [0])  # a rank with no rolled-out sample runs zero-length steps on one
    counts = torch.tensor([offsets[i] for i in rows] if busy else [1], dtype=torch.float32, device=device)
    sigma = sub.sigmas.to(device, torch.float32)
    source = torch.clamp(sigma + counts / STEPS_PER_UNIT_SIGMA, max=1.0)
    step_size = (sigma - source) / counts if busy else torch.zeros_like(sigma)  # negative: towards less noise
    n = prepared.num_target_tokens
    plain = sub.hidden_states[:, :n].to(device, torch.float32)
    references = sub.hidden_states[:, n:].to(device, torch.float32)
    target = sub.target.to(device, torch.float32)
    state = plain + _rows(source - sigma) * target  # on the noising path at s_src

    was_training = model.inner.training
    model.inner.eval()
    try:
        with torch.no_grad():
            def velocity(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
                batch = dataclasses.replace(sub, hidden_states=torch.cat([x, references], dim=1), timestep=s)
                return model_prediction(model.module, batch, device=device, dtype=dtype).float()

            current = source.clone()
            for i in range(steps):
                h = torch.where(counts > i, step_size, torch.zeros_like(step_size))  # done samples stand still
                state = _solver_step(settings.sampler, velocity, state, current, h)
                current = torch.where(counts > i, current + h, current)
            biased = clean = None
            if settings.uses_reflexflow:
                clean = velocity(plain, sigma)
                biased = velocity(state, sigma)
    finally:
        model.inner.train(was_training)
    if not busy:
        return prepared
    here = prepared.hidden_states.device  # the batch's tensors stay where prepare_batch made them
    return _with_rollout(prepared, rows=rows, state=state.to(here), plain=plain.to(here), target=target.to(here),
                         sigma=sigma.to(here), clean=None if clean is None else clean.to(here),
                         biased=None if biased is None else biased.to(here), settings=settings)


def _solver_step(sampler: str, velocity: Velocity, x: torch.Tensor, s: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """One step of size h (per sample) from (x, s) along dx/ds = velocity."""
    hr = _rows(h)
    k1 = velocity(x, s)
    if sampler == "euler":
        return x + hr * k1
    if sampler == "heun":
        k2 = velocity(x + hr * k1, s + h)
        return x + hr * (k1 + k2) / 2
    if sampler == "rk4":
        k2 = velocity(x + hr / 2 * k1, s + h / 2)
        k3 = velocity(x + hr / 2 * k2, s + h / 2)
        k4 = velocity(x + hr * k3, s + h)
        return x + hr / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"scheduled_sampling_sampler {sampler!r} is not one of euler, heun, rk4.")


def _with_rollout(prepared: PreparedBatch, *, rows: list[int], state: torch.Tensor, plain: torch.Tensor,
                  target: torch.Tensor, sigma: torch.Tensor, clean: torch.Tensor | None, biased: torch.Tensor | None,
                  settings: ScheduledSamplingConfig) -> PreparedBatch:
    """prepared with the rolled-out rows' target tokens replaced, and ReflexFlow's weights when it is on."""
    n = prepared.num_target_tokens
    index = torch.tensor(rows)
    hidden = prepared.hidden_states.clone()
    hidden[index, :n] = state.to(hidden.dtype)
    if clean is None or biased is None:
        return dataclasses.replace(prepared, hidden_states=hidden)
    batch = hidden.shape[0]
    exposure = clean - biased
    scale = exposure.abs().flatten(1).sum(dim=1).clamp_min(1e-6)
    weight = torch.ones_like(prepared.target, dtype=torch.float32)
    weight[index] = settings.reflexflow_beta2 * (1.0 + settings.reflexflow_alpha * exposure / _rows(scale))
    clean_latent = plain - _rows(sigma) * target  # x0 = x_t - s (e - x0)
    direction = torch.zeros(batch, target[0].numel())
    direction[index] = torch.nn.functional.normalize((state - clean_latent).flatten(1), dim=1, eps=1e-6)
    drift_weight = torch.zeros(batch)
    drift_weight[index] = settings.reflexflow_beta1
    return dataclasses.replace(prepared, hidden_states=hidden, loss_weight=weight, drift_weight=drift_weight,
                               drift_direction=direction)


def _select(prepared: PreparedBatch, rows: list[int]) -> PreparedBatch:
    """The batch's rows `rows` (every per-sample tensor)."""
    index = torch.tensor(rows)
    return dataclasses.replace(
        prepared, hidden_states=prepared.hidden_states[index], encoder_hidden_states=prepared.encoder_hidden_states[index],
        timestep=prepared.timestep[index], guidance=None if prepared.guidance is None else prepared.guidance[index],
        img_ids=prepared.img_ids[index], txt_ids=prepared.txt_ids[index], target=prepared.target[index],
        sigmas=prepared.sigmas[index])


def _rows(values: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1), to scale each sample's tokens."""
    return values.view(-1, 1, 1)
