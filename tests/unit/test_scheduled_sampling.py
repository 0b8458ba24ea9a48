"""Scheduled sampling (trainer/scheduled_sampling.py, trainer/rollout.py) on the tiny FLUX.2: the plan's draws and
ramp as SimpleTuner defines them, probability 0 is the plain objective exactly, a rollout changes the input and
only the training forward carries gradients, the solvers' orders, ReflexFlow's loss, and offset noise."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from flux2_lora_pack.trainer import rollout
from flux2_lora_pack.trainer.config import LoraConfig, MemoryConfig, ObjectiveConfig, OptimizerConfig, ParallelismConfig
from flux2_lora_pack.trainer.loop import build_optimizer, train_step
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.noise_offset import NoiseOffsetConfig
from flux2_lora_pack.trainer.objective import flow_matching_loss, prepare_batch, sample_generators
from flux2_lora_pack.trainer.parallelize import DistEnv
from flux2_lora_pack.trainer.scheduled_sampling import ScheduledSamplingConfig

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


SEED = 7  # _step_gradients' train_step seed: _prepared draws what that step draws


def _generators(count: int, *, step: int = 0) -> list[torch.Generator]:
    return sample_generators(seed=SEED, step=step, first_index=0, count=count)


# ------------------------------------------------------------------------------------------------ the plan


def test_probability_ramps_as_simpletuner_does():
    flat = ScheduledSamplingConfig(max_step_offset=4, probability=0.3)
    assert [flat.probability_at(s) for s in (0, 50, 10_000)] == [0.3, 0.3, 0.3]
    ramp = ScheduledSamplingConfig(max_step_offset=4, prob_start=0.1, prob_end=0.5, ramp_steps=100, start_step=20)
    assert ramp.probability_at(0) == ramp.probability_at(20) == pytest.approx(0.1)
    assert ramp.probability_at(70) == pytest.approx(0.3)
    assert ramp.probability_at(120) == ramp.probability_at(500) == pytest.approx(0.5)
    cosine = dataclasses.replace(ramp, ramp_shape="cosine")
    assert cosine.probability_at(45) == pytest.approx(0.1 + 0.4 * (0.5 - 0.5 * math.cos(math.pi * 0.25)))
    # prob_start / prob_end default to scheduled_sampling_probability
    half = ScheduledSamplingConfig(max_step_offset=4, probability=0.2, prob_end=0.6, ramp_steps=10)
    assert half.probability_at(0) == pytest.approx(0.2) and half.probability_at(5) == pytest.approx(0.4)


def test_offsets_follow_probability_and_strategy_and_leave_the_sample_generators_alone():
    generators = _generators(400)
    states = [g.get_state() for g in generators]
    assert ScheduledSamplingConfig(max_step_offset=8, probability=0.0).draw_offsets(generators, step=0) == [0] * 400
    draws = {s: ScheduledSamplingConfig(max_step_offset=8, probability=1.0, strategy=s).draw_offsets(generators, step=0)
             for s in ("uniform", "biased_early", "biased_late")}
    assert set(draws["uniform"]) == set(range(9))  # k in [0, max], every value reached
    mean = {s: sum(d) / len(d) for s, d in draws.items()}
    # E[u^2] = 1/3: biased_early ~ 8/3, biased_late ~ 16/3, uniform ~ 4
    assert mean["biased_early"] < 3.2 < mean["uniform"] < 4.8 < mean["biased_late"], mean
    half = ScheduledSamplingConfig(max_step_offset=8, probability=0.5, strategy="biased_late").draw_offsets(
        generators, step=0)
    picked = [k for k in half if k > 0]
    assert 150 < len(picked) < 250
    # the same sample draws the same k on every process count and after a resume; no sample generator moved
    assert half == ScheduledSamplingConfig(max_step_offset=8, probability=0.5,
                                           strategy="biased_late").draw_offsets(_generators(400), step=0)
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states))


def test_keys_read_from_a_simpletuner_config(tiny_model_dir, tmp_path, caplog):
    from flux2_lora_pack.trainer.config import TrainConfig

    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    base = {"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
            "dataset_manifest": str(manifest)}
    config = TrainConfig.from_dict({**base, "--scheduled_sampling_max_step_offset": "10",
                                    "scheduled_sampling_probability": 0.5, "scheduled_sampling_sampler": "heun",
                                    "scheduled_sampling_reflexflow": "false", "offset_noise": True,
                                    "noise_offset": 0.05})
    ss = config.objective.scheduled_sampling
    assert (ss.max_step_offset, ss.probability, ss.sampler, ss.uses_reflexflow) == (10, 0.5, "heun", False)
    assert config.objective.noise_offset == NoiseOffsetConfig(enabled=True, strength=0.05, probability=0.25)
    assert TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="scheduled_sampling_sampler.*Euler"):
        TrainConfig.from_dict({**base, "scheduled_sampling_sampler": "unipc"})
    with pytest.raises(ValueError, match="scheduled_sampling_order"):
        TrainConfig.from_dict({**base, "scheduled_sampling_order": 2})
    with pytest.raises(ValueError, match="scheduled_sampling_probability"):
        TrainConfig.from_dict({**base, "scheduled_sampling_probability": 1.5})
    caplog.clear()
    TrainConfig.from_dict({**base, "scheduled_sampling_max_step_offset": 5, "noise_offset": 0.2})
    warned = caplog.text
    assert "scheduled_sampling_max_step_offset=5 has no effect because the rollout probability is 0" in warned
    assert "noise_offset=0.2 has no effect because offset_noise is false" in warned


# ---------------------------------------------------------------------------------------------- the rollout


def _model(folder, *, tread: bool = False):
    from flux2_lora_pack.trainer.tread import TreadConfig

    model = build_model(inspect_model_folder(folder), lora=LoraConfig(rank=4, alpha=4.0, dropout=0.0, target="all"),
                        memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=False),
                        parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU,
                        tread=TreadConfig.from_dict({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0,
                                                                 "end_layer_idx": -1}]}) if tread else None)
    with torch.no_grad():  # lora_B starts at zero: give the LoRA an effect
        for name, param in model.inner.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model


@pytest.fixture(scope="module")
def samples():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 128, 2, 2, generator=g), torch.randn(3, 8, 96, generator=g)


def _step_gradients(model, samples, objective: ObjectiveConfig) -> tuple[float, dict[str, torch.Tensor]]:
    latents, embeds = samples
    optimizer = build_optimizer(model, optim=OptimizerConfig(max_grad_norm=0.0))
    captured: dict[str, torch.Tensor] = {}
    optimizer.step = lambda: captured.update(
        {n: p.grad.detach().clone() for n, p in model.inner.named_parameters() if p.grad is not None})
    batch = SimpleNamespace(latents=latents, prompt_embeds=embeds, reference_latents=None, image_paths=("a", "b", "c"))
    result = train_step(model, optimizer, micro_batches=[batch], objective=objective, empty_embeds=None, seed=SEED,
                        step=2, env=CPU, max_grad_norm=0.0, nan_policy="stop")
    return result.loss, captured


@pytest.mark.parametrize("tread", [False, True])
def test_probability_zero_is_the_plain_objective_exactly(tiny_model_dir, samples, tread):
    model = _model(tiny_model_dir, tread=tread)
    plain = _step_gradients(model, samples, ObjectiveConfig())
    never = ObjectiveConfig(scheduled_sampling=ScheduledSamplingConfig(max_step_offset=6, probability=0.0))
    loss, grads = _step_gradients(model, samples, never)
    assert loss == plain[0]
    assert grads.keys() == plain[1].keys() and all(torch.equal(grads[n], plain[1][n]) for n in grads)
    always = ObjectiveConfig(scheduled_sampling=ScheduledSamplingConfig(max_step_offset=6, probability=1.0))
    assert _step_gradients(model, samples, always)[0] != plain[0]


def _prepared(samples, *, objective: ObjectiveConfig = ObjectiveConfig()):
    latents, embeds = samples
    generators = _generators(len(latents), step=2)
    return prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=objective,
                         generators=generators), generators


def test_rollout_changes_the_input_under_no_grad_and_the_gradient_is_the_training_forwards(tiny_model_dir, samples):
    model = _model(tiny_model_dir)
    settings = ScheduledSamplingConfig(max_step_offset=5, probability=1.0, reflexflow=False)
    prepared, _ = _prepared(samples)
    calls: list[tuple[bool, bool, int]] = []  # (grad enabled, training mode, batch) of every forward
    hook = model.inner.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((torch.is_grad_enabled(), module.training,
                                                   kwargs["hidden_states"].shape[0])), with_kwargs=True)
    try:
        rolled = rollout.roll_out(model, prepared, offsets=[3, 0, 5], settings=settings, device=CPU.device,
                                  dtype=torch.float32, env=CPU)
        assert calls == [(False, False, 2)] * 5  # the longest rollout, both rolled-out samples in each forward
        assert model.inner.training  # train mode is back
        n = prepared.num_target_tokens
        assert not torch.equal(rolled.hidden_states[0, :n], prepared.hidden_states[0, :n])
        assert torch.equal(rolled.hidden_states[1], prepared.hidden_states[1])  # k = 0: untouched
        assert not torch.equal(rolled.hidden_states[2, :n], prepared.hidden_states[2, :n])
        for field in ("target", "timestep", "encoder_hidden_states", "img_ids", "txt_ids"):
            assert torch.equal(getattr(rolled, field), getattr(prepared, field)), field
        assert not rolled.hidden_states.requires_grad
        # A zero-length rollout is a no-op; the rolled state lies near the plain one (few small steps).
        assert (rolled.hidden_states - prepared.hidden_states).abs().max() < 0.1
    finally:
        hook.remove()
    # The step's gradient is the training forward's on the rolled-out input taken as a constant.
    objective = ObjectiveConfig(scheduled_sampling=settings)
    loss, grads = _step_gradients(model, samples, objective)
    model.inner.zero_grad(set_to_none=True)
    prepared, generators = _prepared(samples)
    offsets = settings.draw_offsets(generators, step=2)
    assert offsets != [0, 0, 0]
    constant = rollout.roll_out(model, prepared, offsets=offsets, settings=settings, device=CPU.device,
                                dtype=torch.float32, env=CPU)
    expected = flow_matching_loss(model.module, constant, device=CPU.device, dtype=torch.float32)
    expected.backward()
    assert float(expected.detach()) == pytest.approx(loss, rel=1e-6)
    for name, param in model.inner.named_parameters():
        if param.grad is not None:
            torch.testing.assert_close(grads[name], param.grad, rtol=1e-5, atol=1e-7)


def test_solvers_have_their_order():
    """dx/ds = x from s = 1 to 0.5 in 4 steps: exact x * exp(-0.5); errors fall by about h^1, h^2, h^4."""
    x0 = torch.ones(1, 1, 1)
    errors = {}
    for sampler in ("euler", "heun", "rk4"):
        x, s = x0.clone(), torch.ones(1)
        for _ in range(4):
            x = rollout._solver_step(sampler, lambda x, s: x, x, s, torch.full((1,), -0.125))
            s = s - 0.125
        errors[sampler] = abs(float(x) - math.exp(-0.5))
    assert errors["euler"] > 1e-2 > errors["heun"] > 1e-4 > errors["rk4"] > 0, errors


def test_reflexflow_weights_and_anti_drift_term(tiny_model_dir, samples):
    model = _model(tiny_model_dir)
    prepared, _ = _prepared(samples)
    off = ScheduledSamplingConfig(max_step_offset=4, probability=1.0, reflexflow=False)
    plain_rolled = rollout.roll_out(model, prepared, offsets=[2, 0, 4], settings=off, device=CPU.device,
                                    dtype=torch.float32, env=CPU)
    base = flow_matching_loss(model.module, plain_rolled, device=CPU.device, dtype=torch.float32)
    with torch.no_grad():
        pred = rollout.model_prediction(model.module, plain_rolled, device=CPU.device, dtype=torch.float32)
        per_sample = (pred - plain_rolled.target).square().flatten(1).mean(1)
    neutral = dataclasses.replace(off, reflexflow=True, reflexflow_alpha=0.0, reflexflow_beta1=0.0,
                                  reflexflow_beta2=1.0)
    with torch.no_grad():
        same = rollout.roll_out(model, prepared, offsets=[2, 0, 4], settings=neutral, device=CPU.device,
                                dtype=torch.float32, env=CPU)
        assert torch.equal(same.hidden_states, plain_rolled.hidden_states)
        torch.testing.assert_close(flow_matching_loss(model.module, same, device=CPU.device, dtype=torch.float32), base)
        doubled = rollout.roll_out(model, prepared, offsets=[2, 0, 4], settings=dataclasses.replace(
            neutral, reflexflow_beta2=2.0), device=CPU.device, dtype=torch.float32, env=CPU)
        loss = flow_matching_loss(model.module, doubled, device=CPU.device, dtype=torch.float32)
        # beta2 scales the rolled-out samples only (0 and 2), not the one trained as usual (1)
        torch.testing.assert_close(loss, (2 * per_sample[0] + per_sample[1] + 2 * per_sample[2]) / 3)
        drift = rollout.roll_out(model, prepared, offsets=[2, 0, 4], settings=dataclasses.replace(
            neutral, reflexflow_beta1=10.0), device=CPU.device, dtype=torch.float32, env=CPU)
        assert drift.drift_weight.tolist() == [10.0, 0.0, 10.0]
        norms = drift.drift_direction.norm(dim=1)
        torch.testing.assert_close(norms, torch.tensor([1.0, 0.0, 1.0]))
        unit = torch.nn.functional.normalize(pred.flatten(1), dim=1)
        adr = (unit - drift.drift_direction).square().sum(1)
        torch.testing.assert_close(flow_matching_loss(model.module, drift, device=CPU.device, dtype=torch.float32),
                                   (per_sample + torch.tensor([10.0, 0.0, 10.0]) * adr).mean())
        weighted = rollout.roll_out(model, prepared, offsets=[2, 0, 4], settings=dataclasses.replace(
            neutral, reflexflow_alpha=1.0), device=CPU.device, dtype=torch.float32, env=CPU)
        weights = weighted.loss_weight
        assert torch.equal(weights[1], torch.ones_like(weights[1]))
        # 1 + alpha * d / sum|d|: the deviations from 1 of a rolled-out sample sum in absolute value to alpha
        torch.testing.assert_close((weights[0] - 1).abs().sum(), torch.tensor(1.0))


def test_offset_noise_adds_one_offset_per_channel_to_the_samples_that_draw_it():
    noise = torch.zeros(64, 4, 3, 3)
    generators = _generators(64)
    off = NoiseOffsetConfig(enabled=False, strength=0.1, probability=1.0)
    assert off.apply(noise, generators) is noise
    always = NoiseOffsetConfig(enabled=True, strength=0.1, probability=1.0).apply(noise, generators)
    assert torch.equal(always, always[:, :, :1, :1].expand_as(always))  # constant over each channel
    assert 0.05 < float(always[:, :, 0, 0].std()) < 0.15
    some = NoiseOffsetConfig(enabled=True, strength=0.1, probability=0.25).apply(noise, generators)
    hit = int((some.flatten(1).abs().sum(1) > 0).sum())
    assert 6 <= hit <= 28
    # prepare_batch: x_t and the target carry the offset; the timesteps are unchanged
    latents, embeds = torch.randn(2, 128, 2, 2), torch.randn(2, 8, 96)
    plain = prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=ObjectiveConfig(),
                          generators=_generators(2))
    offset = prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, generators=_generators(2),
                           spec=ObjectiveConfig(noise_offset=NoiseOffsetConfig(enabled=True, probability=1.0)))
    assert torch.equal(plain.sigmas, offset.sigmas) and not torch.equal(plain.target, offset.target)
