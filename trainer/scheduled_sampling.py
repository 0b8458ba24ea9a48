"""Scheduled sampling (SimpleTuner's "rollout") for FLUX.2 flow matching: its settings and each sample's plan.

Plain flow matching trains on x_t = (1 - s) x0 + s e, a point exactly on the noising path. At inference the model
walks from its own earlier outputs, whose small errors add up (exposure bias). With scheduled sampling, a sample
picked for rollout starts `k` steps noisier than its training timestep, at s + k/1000 on the same path (SimpleTuner's
1000 training timesteps as steps of sigma), and the model itself solves the flow ODE from there down to s under
no_grad (trainer/rollout.py). The training step then sees that self-made x_t with the unchanged target e - x0.

This module holds only the settings and the draws (no model): which samples roll out at a step, and how far.
Every draw comes from a generator derived from the sample's own (objective.sample_generators), never from that
generator itself, so noise, timesteps, dropout and TREAD routing are the same with scheduled sampling on or off,
and probability 0 is the plain objective exactly. Imports nothing heavier than torch (config.py imports it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .settings import check_fields, setting

STEPS_PER_UNIT_SIGMA = 1000
"""One rollout step is 1/1000 of sigma, SimpleTuner's spacing of its 1000 training timesteps."""
SAMPLER_EVALUATIONS = {"euler": 1, "heun": 2, "rk4": 4}
"""Model evaluations per rollout step for each solver."""
_DRAW_SALT = 0x5C4ED  # derives the rollout generator from a sample's own

Strategy = Literal["uniform", "biased_early", "biased_late"]
Sampler = Literal["euler", "heun", "rk4"]


@dataclass(frozen=True, kw_only=True, slots=True)
class ScheduledSamplingConfig:
    """SimpleTuner's scheduled_sampling_* keys with their meaning (documentation/experimental/SCHEDULED_SAMPLING.md)."""

    max_step_offset: int = setting("scheduled_sampling_max_step_offset", 0, ge=0)
    """Most rollout steps before a sample's training timestep; each rolled-out sample draws k in [0, this]
    (scheduled_sampling_strategy). 0 turns scheduled sampling off. Each step costs one to four forwards of the
    model without gradients (scheduled_sampling_sampler); SimpleTuner recommends 5-10. >= 0."""
    probability: float = setting("scheduled_sampling_probability", 0.0, ge=0, le=1)
    """Chance that a sample is rolled out; the others train as usual. Without a ramp it holds for the whole run.
    In [0, 1]."""
    prob_start: float | None = setting("scheduled_sampling_prob_start", None, ge=0, le=1)
    """With scheduled_sampling_ramp_steps: the probability at the ramp's start (and before it). null:
    scheduled_sampling_probability. In [0, 1]."""
    prob_end: float | None = setting("scheduled_sampling_prob_end", None, ge=0, le=1)
    """With scheduled_sampling_ramp_steps: the probability at the ramp's end (and after it). null:
    scheduled_sampling_probability. In [0, 1]."""
    ramp_steps: int = setting("scheduled_sampling_ramp_steps", 0, ge=0)
    """Optimizer steps over which the probability moves from prob_start to prob_end, starting at
    scheduled_sampling_start_step. 0: no ramp. >= 0."""
    start_step: int = setting("scheduled_sampling_start_step", 0, ge=0)
    """Optimizer step at which the ramp starts. >= 0."""
    ramp_shape: Literal["linear", "cosine"] = setting("scheduled_sampling_ramp_shape", "linear")
    """"linear", or "cosine" (slow at both ends: 0.5 - 0.5 cos(pi x))."""
    strategy: Strategy = setting("scheduled_sampling_strategy", "uniform")
    """How k is drawn in [0, max_step_offset]: "uniform"; "biased_early" (round(u^2 max): mostly short rollouts);
    "biased_late" (round((1 - u^2) max): mostly long ones)."""
    sampler: Sampler = setting("scheduled_sampling_sampler", "euler")
    """ODE solver of the rollout: "euler" (1 forward a step; SimpleTuner's flow-matching rollout always steps with
    Euler whatever its sampler says), "heun" (2, second order), "rk4" (4, classic Runge-Kutta)."""
    reflexflow: bool | None = setting("scheduled_sampling_reflexflow", None)
    """ReflexFlow's two corrections on the rolled-out samples (two more forwards without gradients each
    micro-batch): the loss re-weighted by the exposure bias (alpha, beta2) and an anti-drift term (beta1). null:
    on whenever scheduled sampling is, as SimpleTuner does for flow-matching models; false turns it off."""
    reflexflow_alpha: float = setting("scheduled_sampling_reflexflow_alpha", 1.0, ge=0)
    """Frequency compensation: each loss element of a rolled-out sample is weighted by 1 + alpha * d / sum|d|,
    d the model's prediction at the plain x_t minus its prediction at the rolled-out one. 0 disables. >= 0."""
    reflexflow_beta1: float = setting("scheduled_sampling_reflexflow_beta1", 10.0, ge=0)
    """Anti-drift regulariser: adds beta1 * |unit(prediction) - unit(x_rolled - x0)|^2 to a rolled-out sample's
    loss, pointing the predicted velocity from the clean latent through the biased input. 0 disables. >= 0."""
    reflexflow_beta2: float = setting("scheduled_sampling_reflexflow_beta2", 1.0, ge=0)
    """Scale of the (re-weighted) flow-matching loss of rolled-out samples. >= 0."""

    def __post_init__(self) -> None:
        check_fields(self)

    @property
    def enabled(self) -> bool:
        return self.max_step_offset > 0

    @property
    def uses_reflexflow(self) -> bool:
        return self.enabled and (self.reflexflow if self.reflexflow is not None else True)

    def probability_at(self, step: int) -> float:
        """The rollout probability at optimizer step `step` (0-based: the steps done before it), SimpleTuner's ramp."""
        if self.ramp_steps <= 0:
            return self.probability
        start = self.probability if self.prob_start is None else self.prob_start
        end = self.probability if self.prob_end is None else self.prob_end
        if step < self.start_step:
            return start
        progress = min(1.0, (step - self.start_step) / self.ramp_steps)
        if self.ramp_shape == "cosine":
            progress = 0.5 - 0.5 * math.cos(math.pi * progress)
        return start + (end - start) * progress

    def draw_offsets(self, generators: list[torch.Generator], *, step: int) -> list[int]:
        """Rollout steps k per sample (0: trained as usual), from generators derived from the samples' own."""
        if not self.enabled:
            return [0] * len(generators)
        probability = self.probability_at(step)
        offsets = []
        for generator in generators:
            own = torch.Generator().manual_seed((generator.initial_seed() ^ _DRAW_SALT) % (2**63 - 1))
            picked, u = torch.rand(2, generator=own).tolist()
            if picked >= probability:
                offsets.append(0)
            elif self.strategy == "uniform":
                offsets.append(min(int(u * (self.max_step_offset + 1)), self.max_step_offset))
            elif self.strategy == "biased_early":
                offsets.append(round(u * u * self.max_step_offset))
            else:
                offsets.append(round((1.0 - u * u) * self.max_step_offset))
        return offsets

    def offset_distribution(self) -> list[float]:
        """P(k = j), j = 0 .. max_step_offset, for a sample picked for rollout, as draw_offsets draws k from u."""
        top = self.max_step_offset
        if top == 0:
            return [1.0]
        if self.strategy == "uniform":  # min(int(u (top + 1)), top)
            return [1.0 / (top + 1)] * (top + 1)
        # round(u^2 top) = j for u^2 top in [j - 1/2, j + 1/2); biased_late mirrors it: round((1 - u^2) top).
        early = [math.sqrt(min(1.0, (j + 0.5) / top)) - math.sqrt(max(0.0, (j - 0.5) / top)) for j in range(top + 1)]
        return early if self.strategy == "biased_early" else early[::-1]

    def expected_rollout_forwards(self, *, step: int, batch_size: int, world_size: int) -> float:
        """Expected sample-forwards without gradients that rollout.roll_out runs on one process for one micro-batch
        at optimizer step `step`: the solver's evaluations per rollout step x the rollout steps (the largest k over
        all processes' samples) x the rolled-out rows (at least one while any process rolls out), plus
        ReflexFlow's two forwards on those rows. Exact for batch_size samples per process."""
        probability = self.probability_at(step)
        if not self.enabled or probability == 0:
            return 0.0
        picked = self.offset_distribution()
        # Per sample: P(k = 0) and P(k <= j), over being picked or not.
        zero = 1.0 - probability + probability * picked[0]
        at_most = [1.0 - probability + probability * sum(picked[:j + 1]) for j in range(len(picked))]
        others = (world_size - 1) * batch_size

        def rows_when_all_below(j: int) -> float:
            """E[1{every sample has k < j} x max(R, 1)], R = this process's samples with k > 0."""
            below = at_most[j - 1]
            own = sum(math.comb(batch_size, r) * (below - zero) ** r * zero ** (batch_size - r) * max(r, 1)
                      for r in range(batch_size + 1))
            return below ** others * own

        rows = rows_when_all_below(len(picked))  # E[max(R, 1)]: every k is below max_step_offset + 1
        # E[S max(R, 1)] = sum over j >= 1 of E[1{S >= j} max(R, 1)], S = the largest k over all processes.
        solver = sum(rows - rows_when_all_below(j) for j in range(1, len(picked)))
        reflexflow = 2 * (rows - rows_when_all_below(1)) if self.uses_reflexflow else 0.0
        return SAMPLER_EVALUATIONS[self.sampler] * solver + reflexflow

    def mean_rollout_forwards(self, *, first_step: int, last_step: int, batch_size: int, world_size: int) -> float:
        """expected_rollout_forwards averaged over optimizer steps first_step .. last_step (0-based, inclusive); with
        a ramp, over at most 101 evenly spaced steps."""
        if last_step < first_step:
            return 0.0
        count = min(101, last_step - first_step + 1)
        steps = [first_step + round(i * (last_step - first_step) / max(1, count - 1)) for i in range(count)]
        if self.ramp_steps <= 0:
            steps = steps[:1]  # the same probability at every step
        return sum(self.expected_rollout_forwards(step=s, batch_size=batch_size, world_size=world_size)
                   for s in steps) / len(steps)

    def unused_settings(self, changed: set[str]) -> list[tuple[str, str]]:
        """(key, why) for each changed setting these settings ignore (TrainConfig warns)."""
        if not self.enabled:
            return [(key, "scheduled_sampling_max_step_offset is 0") for key in sorted(changed)
                    if key.startswith("scheduled_sampling_") and key != "scheduled_sampling_max_step_offset"]
        unused = []
        if max(self.probability_at(0), self.probability_at(self.start_step + self.ramp_steps)) == 0:
            unused.append(("scheduled_sampling_max_step_offset", "the rollout probability is 0 throughout (set "
                           "scheduled_sampling_probability, or a ramp to a probability above 0)"))
        if self.ramp_steps == 0:
            unused += [(k, "scheduled_sampling_ramp_steps is 0") for k in (
                "scheduled_sampling_prob_start", "scheduled_sampling_prob_end", "scheduled_sampling_start_step",
                "scheduled_sampling_ramp_shape") if k in changed]
        elif self.prob_start is not None and self.prob_end is not None and "scheduled_sampling_probability" in changed:
            unused.append(("scheduled_sampling_probability", "the ramp runs from scheduled_sampling_prob_start to "
                           "scheduled_sampling_prob_end"))
        if not self.uses_reflexflow:
            unused += [(k, "scheduled_sampling_reflexflow is false") for k in sorted(changed)
                       if k.startswith("scheduled_sampling_reflexflow_")]
        return unused
