"""Optimizers and learning-rate schedules with SimpleTuner's names: adamw_bf16's Kahan-compensated bf16 updates,
optimizer_config keys reaching the optimizer (and every other key refused), optional packages named when missing,
prodigy's Schedule-Free weights, the new schedules against SimpleTuner's formulas, and resume of every optimizer
on the tiny FLUX.2 matching an uninterrupted run."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from flux2_lora_pack.trainer import loop
from flux2_lora_pack.trainer.config import LoraConfig, MemoryConfig, ObjectiveConfig, ParallelismConfig
from flux2_lora_pack.trainer.ema import EmaConfig, LoraEma
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.optimizers import (AdamWBF16, OptimizerConfig, ScheduleConfig, build_lr_scheduler,
                                                build_optimizer, evaluation_weights, lr_lambda, parse_optimizer_config)
from flux2_lora_pack.trainer.parallelize import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
optimi = pytest.importorskip("optimi", reason="optimi-lion needs torch-optimi (requirements-test.txt)")
prodigyplus = pytest.importorskip("prodigyplus", reason="prodigy needs prodigy-plus-schedule-free (requirements-test.txt)")


def _holder(*params: torch.nn.Parameter) -> SimpleNamespace:
    """What build_optimizer reads of a Model: .module's parameters."""
    module = torch.nn.Module()
    for i, p in enumerate(params):
        module.register_parameter(f"w{i}", p)
    return SimpleNamespace(module=module, inner=module)


# --- adamw_bf16: bf16 weights that still take updates below bf16's resolution -------------------------------------


def _run(optimizer_cls, param: torch.nn.Parameter, grads: list[torch.Tensor], **kwargs) -> torch.Tensor:
    opt = optimizer_cls([param], lr=1e-4, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0, **kwargs)
    _LAST[id(param)] = opt
    for g in grads:
        param.grad = g.to(param.dtype)
        opt.step()
    return param.detach().float()


def test_adamw_bf16_keeps_updates_smaller_than_bf16_resolution():
    # Weights in [1, 1.5) (bf16 spacing 2**-7 there) take AdamW steps of about lr = 1e-4: 1/78 of the spacing.
    g = torch.Generator().manual_seed(0)
    start = (1.0 + torch.rand(4096, generator=g) * 0.5).to(torch.bfloat16).float()  # representable in bf16
    grads = [torch.randn(4096, generator=g) + 0.5 for _ in range(800)]  # a drift plus noise, as in training
    exact = _run(torch.optim.AdamW, torch.nn.Parameter(start.clone()), grads)
    bf16 = torch.nn.Parameter(start.to(torch.bfloat16))
    compensated = _run(AdamWBF16, bf16, grads)
    plain = _run(torch.optim.AdamW, torch.nn.Parameter(start.to(torch.bfloat16)), grads)
    spacing = 2.0 ** -7
    assert float((exact - start).mean()) < -3 * spacing  # the fp32 run moved by several spacings of small steps
    assert torch.equal(plain, start)  # plain bf16 AdamW loses every one of them: each rounds back onto the weight
    # Kahan summation keeps them: every weight stays within half a spacing of the fp32 run's (rounding to the
    # nearest bf16), so on average none is lost, and weight + compensation follows the fp32 sum closely.
    total = compensated + _compensation(bf16)
    assert float((total - exact).abs().max()) < spacing / 20
    assert float((compensated - exact).abs().max()) <= spacing / 2 + spacing / 20
    assert abs(float((compensated - exact).mean())) < 0.1 * float((exact - start).abs().mean())
    assert bf16.dtype == torch.bfloat16


_LAST: dict[int, AdamWBF16] = {}


def _compensation(param: torch.nn.Parameter) -> torch.Tensor:
    return _LAST[id(param)].state[param]["compensation"].float()


def test_adamw_bf16_weight_decay_is_decoupled_and_not_lost():
    param = torch.nn.Parameter(torch.ones(64, dtype=torch.bfloat16))
    opt = AdamWBF16([param], lr=1e-3, weight_decay=1e-2)  # decay of 1e-5 per step: 1/390 of bf16's spacing below 1
    for _ in range(1000):
        param.grad = torch.zeros(64, dtype=torch.bfloat16)
        opt.step()
    assert float(param.detach().float().mean()) == pytest.approx((1 - 1e-5) ** 1000, abs=2 ** -8)


def test_adamw_bf16_refuses_fp32_weights():
    param = torch.nn.Parameter(torch.ones(4))
    param.grad = torch.ones(4)
    with pytest.raises(RuntimeError, match="bf16 weights only"):
        AdamWBF16([param]).step()


# --- optimizer_config and the beta keys -----------------------------------------------------------------------------


def test_optimizer_config_is_typed_per_optimizer():
    assert parse_optimizer_config("d_coef=0.5, use_bias_correction=true,prodigy_steps=100,eps=none",
                                  optimizer="prodigy") == {"d_coef": 0.5, "use_bias_correction": True,
                                                           "prodigy_steps": 100, "eps": None}
    assert parse_optimizer_config("weight_decay=0.1,decouple_lr=True,max_lr=1e-3", optimizer="optimi-lion") == {
        "weight_decay": 0.1, "decouple_lr": True, "max_lr": 1e-3}
    assert parse_optimizer_config("", optimizer="adamw_bf16") == {}


@pytest.mark.parametrize(("optimizer", "text", "message"), [
    ("adamw_bf16", "amsgrad=true", r"key 'amsgrad' is not taken by optimizer 'adamw_bf16' here: unknown setting\. "
                                   r"It takes \['eps', 'weight_decay'\]"),
    ("optimi-lion", "kahan_sum=true", r"'kahan_sum' .*LoRA weights are fp32"),
    ("optimi-lion", "gradient_release=true", r"'gradient_release' .*after the whole backward"),
    ("prodigy", "fused_back_pass=true", r"'fused_back_pass' .*no fused backward pass"),
    ("prodigy", "split_groups=false", r"'split_groups' .*one parameter group"),
    ("prodigy", "betas=0.9", r"optimizer_beta1 and optimizer_beta2"),
    ("adamw_bf16", "lr=1", r"set learning_rate"),
    ("prodigy", "d_coef", r"entry 'd_coef' is not key=value"),
    ("prodigy", "d_coef=1,d_coef=2", r"sets 'd_coef' twice"),
    ("prodigy", "d_coef=big", r"optimizer_config d_coef must be a number"),
    ("prodigy", "d_coef=-1", r"optimizer_config d_coef must be > 0"),
    ("prodigy", "use_speed=1", r"optimizer_config use_speed must be true or false"),
    ("prodigy", "beta3=1.5", r"optimizer_config beta3 must be in \[0, 1\)"),
    ("prodigy", "prodigy_steps=2.5", r"prodigy_steps must be a whole number"),
])
def test_optimizer_config_refuses_what_the_optimizer_does_not_take(optimizer, text, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(optimizer=optimizer, optimizer_config=text)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"optimizer": "adamw", "optimizer_config": "eps=1e-6"}, r"optimizer_config is set but optimizer 'adamw' takes adam_beta1"),
    ({"optimizer": "adamw", "optimizer_beta1": 0.9, "optimizer_beta2": 0.9}, r"optimizer_beta1 is set but optimizer 'adamw'"),
    ({"optimizer": "prodigy", "optimizer_beta1": 0.9}, r"optimizer_beta1 and optimizer_beta2 are set together"),
    ({"optimizer": "optimi-lion", "prodigy_steps": 5}, r"prodigy_steps is set but the optimizer is 'optimi-lion'"),
    ({"optimizer": "prodigy", "prodigy_steps": 5, "optimizer_config": "prodigy_steps=6"}, r"prodigy_steps is given twice"),
])
def test_beta_and_prodigy_keys_are_refused_where_they_do_nothing(kwargs, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**kwargs)


CASES = {  # optimizer -> (config, {group key: value it must reach})
    "adamw_bf16": ({"optimizer_beta1": 0.8, "optimizer_beta2": 0.95, "optimizer_config": "weight_decay=0.05,eps=1e-7"},
                   {"betas": (0.8, 0.95), "weight_decay": 0.05, "eps": 1e-7, "lr": 1e-4}),
    "optimi-lion": ({"optimizer_beta1": 0.8, "optimizer_beta2": 0.95,
                     "optimizer_config": "weight_decay=0.05,decouple_lr=true,max_lr=0.01"},
                    {"beta1": 0.8, "beta2": 0.95, "weight_decay": 0.05, "decouple_lr": True, "max_lr": 0.01, "lr": 1e-4}),
    "prodigy": ({"optimizer_beta1": 0.8, "optimizer_beta2": 0.95, "prodigy_steps": 7, "optimizer_config": (
        "lr=0.5,beta3=0.9,weight_decay=0.05,weight_decay_by_lr=false,use_bias_correction=true,d0=1e-5,d_coef=2,"
        "d_limiter=false,schedulefree_c=8,eps=1e-6,factored=false,factored_fp32=false,use_stableadamw=false,"
        "use_schedulefree=false,use_speed=true,use_cautious=true,use_grams=true,use_adopt=true,use_orthograd=true,"
        "use_focus=true")},
        {"betas": (0.8, 0.95), "prodigy_steps": 7, "lr": 0.5, "beta3": 0.9, "weight_decay": 0.05,
         "weight_decay_by_lr": False, "use_bias_correction": True, "d0": 1e-5, "d_coef": 2.0, "d_limiter": False,
         "schedulefree_c": 8.0, "eps": 1e-6, "factored": False, "factored_fp32": False, "use_stableadamw": False,
         "use_schedulefree": False, "use_speed": True, "use_cautious": True, "use_grams": False,  # the package:
         "use_adopt": True, "use_orthograd": True, "use_focus": True}),  # grams is off when cautious is on
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_key_reaches_the_optimizer(name):
    settings, expected = CASES[name]
    optim = OptimizerConfig(optimizer=name, **settings)
    optim.check_installed()
    param = torch.nn.Parameter(torch.zeros(4, 4, dtype=optim.lora_dtype))
    group = build_optimizer(_holder(param), optim=optim).param_groups[0]
    assert {k: group[k] for k in expected} == expected
    # and SimpleTuner's defaults when nothing is set
    default = build_optimizer(_holder(torch.nn.Parameter(torch.zeros(4, dtype=optim.lora_dtype))),
                              optim=OptimizerConfig(optimizer=name)).param_groups[0]
    betas = default["betas"] if "betas" in default else (default["beta1"], default["beta2"])
    assert betas == {"adamw_bf16": (0.9, 0.999), "optimi-lion": (0.9, 0.99), "prodigy": (0.9, 0.99)}[name]


def test_adamw_keeps_the_adam_keys():
    optim = OptimizerConfig(adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.05, adam_epsilon=1e-7)
    opt = build_optimizer(_holder(torch.nn.Parameter(torch.zeros(4))), optim=optim)
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["betas"], group["weight_decay"], group["eps"], group["lr"]) == ((0.8, 0.95), 0.05, 1e-7, 1e-4)


def test_adam_keys_with_another_optimizer_warn(caplog):
    OptimizerConfig(optimizer="adamw_bf16", adam_weight_decay=0.3)
    assert "adam_weight_decay has no effect with optimizer 'adamw_bf16'" in caplog.text


def test_prodigy_uses_its_own_lr_multiplier_as_simpletuner_does(caplog):
    assert OptimizerConfig(optimizer="prodigy").optimizer_kwargs()["lr"] == 1.0
    assert OptimizerConfig(optimizer="prodigy").base_lr == 1.0
    assert OptimizerConfig(optimizer="prodigy", optimizer_config="lr=0.5").base_lr == 0.5
    OptimizerConfig(optimizer="prodigy", learning_rate=3e-4)
    assert "learning_rate 0.0003 has no effect with optimizer 'prodigy'" in caplog.text


@pytest.mark.parametrize(("name", "module", "pip"), [("optimi-lion", "optimi", "torch-optimi"),
                                                     ("prodigy", "prodigyplus", "prodigy-plus-schedule-free")])
def test_a_missing_optional_package_is_named(monkeypatch, name, module, pip):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == module else real(n, *a))
    optim = OptimizerConfig(optimizer=name)  # reading the config still works (an exported run may go elsewhere) ...
    with pytest.raises(ValueError, match=rf"needs the Python package '{pip}', which is not installed: pip install {pip}"):
        optim.check_installed()  # ... launching here or starting the trainer does not


def test_a_missing_package_stops_the_trainer_before_anything_loads(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "prodigyplus" else real(n, *a))
    monkeypatch.setattr("flux2_lora_pack.trainer.model_files.inspect_model_folder",
                        lambda *a, **k: pytest.fail("the model folder was read before the optimizer check"))
    config = SimpleNamespace(optim=OptimizerConfig(optimizer="prodigy"),
                             checkpoint=SimpleNamespace(output_dir=tmp_path))
    with pytest.raises(ValueError, match="pip install prodigy-plus-schedule-free"):
        loop.build_run(config, env=CPU, events=None, where={})


def test_prodigy_is_refused_on_fsdp2_over_several_processes():
    optim = OptimizerConfig(optimizer="prodigy")
    optim.check_processes(distributed="fsdp2", world_size=1)
    optim.check_processes(distributed="ddp", world_size=4)
    with pytest.raises(ValueError, match="'prodigy' cannot run with distributed 'fsdp2' over several processes"):
        optim.check_processes(distributed="fsdp2", world_size=2)


def test_schedule_free_weights_are_evaluated_and_training_resumes_on_its_own():
    param = torch.nn.Parameter(torch.randn(8, 8, generator=torch.Generator().manual_seed(0)))
    opt = build_optimizer(_holder(param), optim=OptimizerConfig(optimizer="prodigy", optimizer_config="d0=1e-2"))
    for step in range(5):
        param.grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(step + 1))
        opt.step()
    training = param.detach().clone()
    z = opt.state[param]["z"].float()
    beta1 = opt.param_groups[0]["betas"][0]
    with evaluation_weights(opt):
        # Schedule-Free's evaluation point x from the training point y and z: y = beta1 x + (1 - beta1) z
        torch.testing.assert_close(param.detach(), (training - (1 - beta1) * z) / beta1, rtol=1e-5, atol=1e-6)
        assert opt.param_groups[0]["train_mode"] is False
    torch.testing.assert_close(param.detach(), training, rtol=1e-6, atol=1e-6)
    assert opt.param_groups[0]["train_mode"] is True
    plain = build_optimizer(_holder(torch.nn.Parameter(torch.ones(2))), optim=OptimizerConfig())
    with evaluation_weights(plain):  # optimizers without Schedule-Free weights: nothing to switch
        pass


# --- learning-rate schedules -----------------------------------------------------------------------------------------


def _simpletuner_polynomial(step, *, warmup, total, lr, lr_end, power):
    """SimpleTuner's get_polynomial_decay_schedule_with_warmup, as a multiplier (warm-up one step later here)."""
    if step < warmup:
        return (step + 1) / warmup
    pct_remaining = 1 - (step - warmup) / (total - warmup)
    return ((lr - lr_end) * pct_remaining ** power + lr_end) / lr


def test_polynomial_decays_to_lr_end_with_lr_power():
    factor = lr_lambda(scheduler="polynomial", warmup_steps=2, total_steps=12, lr_end=1e-5, lr_power=2.0, base_lr=1e-4)
    for step in range(13):
        assert factor(step) == pytest.approx(_simpletuner_polynomial(step, warmup=2, total=12, lr=1e-4, lr_end=1e-5,
                                                                      power=2.0))
    assert factor(12) == pytest.approx(0.1) and factor(50) == pytest.approx(0.1)  # lr_end, and it stays there


def test_cosine_with_restarts_runs_lr_num_cycles_cycles_down_to_lr_end():
    factor = lr_lambda(scheduler="cosine_with_restarts", warmup_steps=2, total_steps=22, lr_end=0.0, lr_num_cycles=2,
                       base_lr=1.0)
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]  # warm-up
    assert factor(2) == 1.0 and factor(12) == 1.0  # each cycle starts at the top ...
    assert factor(7) == pytest.approx(0.5) and factor(11) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert factor(22) == 0.0  # ... and the run ends at lr_end
    floor = lr_lambda(scheduler="cosine_with_restarts", warmup_steps=0, total_steps=10, lr_end=0.25, base_lr=1.0)
    assert min(floor(s) for s in range(11)) == pytest.approx(0.25)


def test_sine_is_simpletuners_wave():
    # SimpleTuner's Sine: lr = eta_min + (base - eta_min) * 0.5 * (1 + sin(pi * step / T_0)), T_0 = lr_warmup_steps
    factor = lr_lambda(scheduler="sine", warmup_steps=10, total_steps=100, lr_end=2e-5, base_lr=1e-4)
    for step in range(100):
        simpletuner = 2e-5 + (1e-4 - 2e-5) * 0.5 * (1 + math.sin(math.pi * step / 10))
        assert factor(step) * 1e-4 == pytest.approx(simpletuner)
    assert factor(0) * 1e-4 == pytest.approx(6e-5) and factor(5) == pytest.approx(1.0)
    assert factor(15) * 1e-4 == pytest.approx(2e-5)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"scheduler": "sine"}, r"'sine' uses lr_warmup_steps as the half-period"),
    ({"scheduler": "cosine", "warmup_steps": 20, "total_steps": 10}, "is more than max_train_steps"),
])
def test_schedule_rules(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScheduleConfig(**kwargs)


def test_lr_end_must_lie_below_the_learning_rate():
    ScheduleConfig(scheduler="polynomial", lr_end=1e-5).check_base_lr(1e-4)
    ScheduleConfig(scheduler="linear", lr_end=1.0).check_base_lr(1e-4)  # linear does not use it
    with pytest.raises(ValueError, match=r"lr_end 0.001 must be smaller than the learning rate 0.0001"):
        ScheduleConfig(scheduler="polynomial", lr_end=1e-3).check_base_lr(1e-4)


def test_schedule_keys_without_their_scheduler_warn(caplog):
    ScheduleConfig(scheduler="cosine", lr_power=2.0, lr_num_cycles=3)
    assert "lr_power has no effect with lr_scheduler 'cosine'" in caplog.text
    assert "lr_num_cycles has no effect with lr_scheduler 'cosine'" in caplog.text


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_the_scheduler_scales_prodigys_own_lr():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = build_optimizer(_holder(param), optim=OptimizerConfig(optimizer="prodigy"))
    sched = build_lr_scheduler(opt, schedule=ScheduleConfig(scheduler="polynomial", warmup_steps=0, total_steps=4,
                                                            lr_end=0.5, lr_power=1.0))
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step()
    assert lrs == pytest.approx([1.0, 0.875, 0.75, 0.625])


# --- resume on the tiny FLUX.2: every optimizer, with the EMA, equals an uninterrupted run --------------------------


def _model(folder, dtype):
    model = build_model(inspect_model_folder(folder), lora=LoraConfig(rank=2, alpha=2.0, dropout=0.0, target="tiny"),
                        memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=False),
                        parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, lora_dtype=dtype)
    with torch.no_grad():  # lora_B starts at zero, which leaves lora_A without gradient: give it values
        for name, param in model.inner.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return model


def _train(run, first: int, count: int) -> None:
    g = torch.Generator().manual_seed(0)
    latents, embeds = torch.randn(6, 1, 128, 2, 2, generator=g), torch.randn(6, 1, 8, 96, generator=g)
    for step in range(first, first + count):
        batch = SimpleNamespace(latents=latents[step], prompt_embeds=embeds[step], reference_latents=None,
                                image_paths=("a.png",))
        result = loop.train_step(run.model, run.optimizer, micro_batches=[batch], objective=ObjectiveConfig(),
                                 empty_embeds=None, seed=7, step=step, env=CPU, max_grad_norm=1.0, nan_policy="stop")
        assert result.applied
        run.lr_scheduler.step()
        run.ema.update(step=step + 1)


def _fresh(folder, optim: OptimizerConfig) -> SimpleNamespace:
    model = _model(folder, optim.lora_dtype)
    optimizer = build_optimizer(model, optim=optim)
    return SimpleNamespace(model=model, optimizer=optimizer, lr_scheduler=build_lr_scheduler(
        optimizer, schedule=ScheduleConfig(scheduler="cosine", warmup_steps=1, total_steps=4)),
        ema=LoraEma(model, settings=EmaConfig(enabled=True, decay=0.9), device=torch.device("cpu")))


SAMPLER = SimpleNamespace(state_dict=lambda: {"position": 3}, load_state_dict=lambda state: None)


@pytest.mark.parametrize("optim", [
    OptimizerConfig(), OptimizerConfig(optimizer="adamw_bf16", learning_rate=1e-3),
    OptimizerConfig(optimizer="optimi-lion", learning_rate=1e-3),
    OptimizerConfig(optimizer="prodigy", optimizer_config="d0=1e-3"),
], ids=lambda o: o.optimizer)
def test_resume_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, optim):
    straight = _fresh(tiny_model_dir, optim)
    _train(straight, 0, 4)
    first = _fresh(tiny_model_dir, optim)
    _train(first, 0, 2)
    path = loop.save_training_checkpoint(first.model, first.optimizer, first.lr_scheduler, output_dir=tmp_path, step=2,
                                         sampler=SAMPLER, total_limit=None, env=CPU, run_meta={}, ema=first.ema)
    resumed = _fresh(tiny_model_dir, optim)
    assert loop.restore_checkpoint(resumed.model, resumed.optimizer, resumed.lr_scheduler, path=path, sampler=SAMPLER,
                                   env=CPU, ema=resumed.ema) == 2
    _train(resumed, 2, 2)
    lora = {n: p for n, p in straight.model.inner.named_parameters() if p.requires_grad}
    again = dict(resumed.model.inner.named_parameters())
    initial = dict(_model(tiny_model_dir, optim.lora_dtype).inner.named_parameters())
    assert all(not torch.equal(param, initial[name]) for name, param in lora.items())  # training moved every weight
    for name, param in lora.items():
        torch.testing.assert_close(again[name], param, rtol=0, atol=0)
    for shadow, expected in zip(resumed.ema.shadows, straight.ema.shadows):
        torch.testing.assert_close(shadow, expected, rtol=0, atol=0)
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]
