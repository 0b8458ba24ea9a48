"""EMA of the LoRA weights (use_ema and SimpleTuner's related keys): the decay on a known sequence, the update
interval and warm-up, where it lives, checkpoint and resume, the saved <output_name>_ema.safetensors loading like
the LoRA, and which weights validation renders with (ema_validation). FSDP2 shards: tests/unit/test_optimizers_fsdp2.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from flux2_lora_pack.trainer import flux2, loop
from flux2_lora_pack.trainer.config import LoraConfig, MemoryConfig, ParallelismConfig, TrainConfig
from flux2_lora_pack.trainer.ema import EmaConfig, LoraEma, decay_at
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.model_files import inspect_model_folder
from flux2_lora_pack.trainer.optimizers import OptimizerConfig, build_optimizer
from flux2_lora_pack.trainer.parallelize import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lora_A = torch.nn.Linear(3, 2, bias=False)
        self.frozen = torch.nn.Linear(2, 2, bias=False).requires_grad_(False)


def _toy() -> SimpleNamespace:
    module = Toy()
    with torch.no_grad():
        module.lora_A.weight.zero_()
    return SimpleNamespace(module=module, inner=module)


def _set(model, value: float) -> None:
    with torch.no_grad():
        model.inner.lora_A.weight.fill_(value)


def _value(ema: LoraEma) -> float:
    return float(ema.shadows[0][0, 0])


def test_decay_follows_simpletuners_ramp():
    # SimpleTuner's EMAModel.get_decay at global step k (no ema_warmup_steps): 0, then min((1 + s) / (10 + s), decay)
    assert [decay_at(k, decay=0.995) for k in (1, 2, 3, 11)] == [0.0, 2 / 11, 3 / 12, 11 / 20]
    assert decay_at(10_000, decay=0.995) == 0.995
    assert [decay_at(k, decay=0.9, warmup_steps=3) for k in (1, 2, 3, 4)] == [0.0, 0.0, 0.9, 0.9]


def test_average_of_a_known_sequence():
    model = _toy()
    ema = LoraEma(model, settings=EmaConfig(enabled=True, decay=0.3), device=torch.device("cpu"))
    assert ema.names == ["lora_A.weight"]  # only trainable weights, named as the saved LoRA names them
    expected = 0.0
    for step, value in enumerate([4.0, 2.0, 8.0, -1.0, 5.0], start=1):
        _set(model, value)
        assert ema.update(step=step)
        d = min((1 + (step - 1)) / (10 + (step - 1)), 0.3) if step > 1 else 0.0
        expected = d * expected + (1 - d) * value
        assert _value(ema) == pytest.approx(expected, rel=1e-6)
        assert ema.decay == pytest.approx(d)
    # step 1 copies, step 2 keeps 2/11 of it, steps 3+ are capped at ema_decay 0.3
    assert _value(ema) == pytest.approx(
        0.3 * (0.3 * (0.25 * (2 / 11 * 4 + 9 / 11 * 2) + 0.75 * 8) + 0.7 * -1) + 0.7 * 5, rel=1e-6)


def test_update_interval_and_warmup_steps():
    model = _toy()
    ema = LoraEma(model, settings=EmaConfig(enabled=True, decay=0.5, update_interval=2), device=torch.device("cpu"))
    _set(model, 6.0)
    assert not ema.update(step=1) and _value(ema) == 0.0  # not due: the average keeps its start (the initial LoRA)
    assert ema.update(step=2) and _value(ema) == pytest.approx(9 / 11 * 6.0)  # the decay of global step 2
    warm = LoraEma(model, settings=EmaConfig(enabled=True, decay=0.5, warmup_steps=3), device=torch.device("cpu"))
    for step, value in enumerate([1.0, 2.0, 10.0], start=1):
        _set(model, value)
        warm.update(step=step)
    assert _value(warm) == pytest.approx(0.5 * 2.0 + 0.5 * 10.0)  # copies before step 3, ema_decay from step 3


def test_foreach_and_tensor_by_tensor_agree(monkeypatch):
    calls = []
    real = torch._foreach_lerp_
    monkeypatch.setattr(torch, "_foreach_lerp_", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    results = []
    for disable in (False, True):
        model = _toy()
        ema = LoraEma(model, settings=EmaConfig(enabled=True, foreach_disable=disable), device=torch.device("cpu"))
        for step in range(1, 5):
            _set(model, float(step * step))
            ema.update(step=step)
        results.append(ema.shadows[0].clone())
        assert len(calls) == 4  # one fused call per update; ema_foreach_disable's run adds none
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize(("device", "cpu_only", "where"), [("cpu", False, "cpu"), ("accelerator", False, "meta"),
                                                           ("accelerator", True, "cpu")])
def test_ema_device_and_cpu_only_choose_where_it_lives(device, cpu_only, where):
    # "meta" stands in for the process's accelerator
    ema = LoraEma(_toy(), settings=EmaConfig(enabled=True, device=device, cpu_only=cpu_only),
                  device=torch.device("meta"))
    assert ema.shadows[0].device.type == where and ema.shadows[0].dtype == torch.float32


def test_ema_keys_without_use_ema_warn(caplog):
    EmaConfig(decay=0.9, validation="ema_only")
    assert "ema_decay has no effect because use_ema is off" in caplog.text
    assert "ema_validation has no effect because use_ema is off" in caplog.text


def test_keys_read_from_simpletuner_json(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    config = TrainConfig.from_dict({
        "pretrained_model_name_or_path": str(tmp_path / "model"), "output_dir": str(tmp_path / "out"),
        "dataset_manifest": str(tmp_path / "manifest.json"), "use_ema": "true", "ema_decay": "0.999",
        "ema_update_interval": 2, "ema_warmup_steps": 5, "ema_validation": "ema_only", "ema_device": "accelerator",
        "ema_cpu_only": True, "ema_foreach_disable": True})
    assert config.ema == EmaConfig(enabled=True, decay=0.999, update_interval=2, warmup_steps=5, validation="ema_only",
                                   device="accelerator", cpu_only=True, foreach_disable=True)
    assert config.ema.on_cpu and TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        EmaConfig(enabled=True, decay=1.0)


# --- checkpoints, the saved file, validation ------------------------------------------------------------------------


SAMPLER = SimpleNamespace(state_dict=lambda: {}, load_state_dict=lambda state: None)


def _checkpoint(model, optimizer, out: Path, ema: LoraEma | None) -> Path:
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return loop.save_training_checkpoint(model, optimizer, scheduler, output_dir=out, step=3, sampler=SAMPLER,
                                         total_limit=None, env=CPU, run_meta={}, ema=ema)


def test_checkpoint_round_trip_and_a_checkpoint_without_ema(tmp_path, caplog):
    model = _toy()
    optimizer = build_optimizer(model, optim=OptimizerConfig())
    ema = LoraEma(model, settings=EmaConfig(enabled=True), device=torch.device("cpu"))
    for step, value in enumerate([1.0, 3.0, 7.0], start=1):
        _set(model, value)
        ema.update(step=step)
    with_ema = _checkpoint(model, optimizer, tmp_path / "a", ema)
    without = _checkpoint(model, optimizer, tmp_path / "b", None)
    restored = LoraEma(model, settings=EmaConfig(enabled=True), device=torch.device("cpu"))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    loop.restore_checkpoint(model, optimizer, scheduler, path=with_ema, sampler=SAMPLER, env=CPU, ema=restored)
    torch.testing.assert_close(restored.shadows[0], ema.shadows[0], rtol=0, atol=0)
    # use_ema turned on when resuming a run that had none: the average starts at the resumed weights
    late = LoraEma(_toy(), settings=EmaConfig(enabled=True), device=torch.device("cpu"))
    loop.restore_checkpoint(model, optimizer, scheduler, path=without, sampler=SAMPLER, env=CPU, ema=late)
    assert float(late.shadows[0][0, 0]) == 7.0 and "has no EMA" in caplog.text


def _tiny(folder, *, seed: int):
    model = build_model(inspect_model_folder(folder), lora=LoraConfig(rank=2, alpha=1.0, dropout=0.0, target="tiny"),
                        memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=False),
                        parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU)
    with torch.no_grad():
        for name, param in model.inner.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(seed + len(name))) * 0.05)
    return model


def _inputs() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(1, 16, 128, generator=g), "encoder_hidden_states": torch.randn(1, 8, 96, generator=g),
            "timestep": torch.full((1,), 0.4), "guidance": torch.ones(1), "img_ids": flux2.image_position_ids(1, 4, 4),
            "txt_ids": flux2.text_position_ids(1, 8), "return_dict": False}


def test_ema_file_loads_like_the_lora(tiny_model_dir, tmp_path):
    from flux2_lora_pack.trainer.inference import LoraRef
    from flux2_lora_pack.trainer.lora_adapters import attached_loras
    from flux2_lora_pack.trainer.lora_keys import load_lora_file
    from flux2_lora_pack.trainer.model_files import load_transformer
    from flux2_lora_pack.trainer.preflight import check_lora_fits_model

    model = _tiny(tiny_model_dir, seed=0)
    ema = LoraEma(model, settings=EmaConfig(enabled=True), device=torch.device("cpu"))
    trained = {n: p.detach().clone() for n, p in model.inner.named_parameters() if p.requires_grad}
    with torch.no_grad():  # the weights move on: the average now differs from them
        for param in (p for p in model.inner.parameters() if p.requires_grad):
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 0.05)
    ema.update(step=2)
    (tmp_path / "m").mkdir()
    (tmp_path / "d.json").write_text("{}")
    config = TrainConfig.from_dict({"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path),
                                    "dataset_manifest": str(tmp_path / "d.json"), "use_ema": True, "lora_rank": 2,
                                    "lora_alpha": 1.0, "flux_lora_target": "tiny", "output_name": "run"})
    path = loop.save_final_lora(model, config=config, out_dir=tmp_path, step=2, env=CPU, dataset_fingerprint="f",
                                ema=ema)
    ema_path = tmp_path / "run_ema.safetensors"
    assert path == tmp_path / "run.safetensors" and ema_path.is_file()
    lora_state, lora_meta, layout = load_lora_file(path)
    ema_state, ema_meta, ema_layout = load_lora_file(ema_path)
    assert layout == ema_layout == "comfyui" and lora_state.keys() == ema_state.keys()
    assert {k: v for k, v in ema_meta.items() if k != "ema_decay"} == lora_meta and json.loads(ema_meta["ema_decay"]) == 0.995
    check_lora_fits_model(ema_path, folder=inspect_model_folder(tiny_model_dir))
    # loaded onto a fresh transformer, it acts exactly as the in-memory model with the EMA applied
    with ema.applied(model), torch.no_grad():
        expected = model.module(**_inputs())[0]
    with torch.no_grad():
        current = model.module(**_inputs())[0]
    base = load_transformer(inspect_model_folder(tiny_model_dir), precision="fp32")
    with attached_loras(base, loras=[LoraRef(path=str(ema_path))]), torch.no_grad():
        loaded = base(**_inputs())[0]
    torch.testing.assert_close(loaded, expected, rtol=1e-5, atol=1e-6)
    assert (loaded - current).abs().max() > 1e-4
    # decay_at(2) = 2/11 of the start (the trained weights at creation) and 9/11 of the moved weights
    torch.testing.assert_close(ema.shadows[0], 2 / 11 * next(iter(trained.values())) + 9 / 11 * next(
        p for p in model.inner.parameters() if p.requires_grad).detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("mode", "renders"), [("comparison", [None, "ema"]), ("ema_only", ["ema"]),
                                               ("none", [None])])
def test_ema_validation_chooses_the_weights_rendered(mode, renders):
    model = _toy()
    _set(model, 2.0)
    ema = LoraEma(model, settings=EmaConfig(enabled=True), device=torch.device("cpu"))
    _set(model, 5.0)
    seen = []

    def render(m, *, step, out_dir, env, variant=None):
        seen.append((variant, float(m.inner.lora_A.weight.detach()[0, 0])))
        return [{"variant": variant}]

    run = SimpleNamespace(validation=SimpleNamespace(render=render), ema=ema, model=model, out_dir=Path("."), env=CPU,
                          optimizer=build_optimizer(model, optim=OptimizerConfig()),
                          config=SimpleNamespace(ema=EmaConfig(enabled=True, validation=mode)))
    images = loop.render_validation(run, step=1)
    assert [i["variant"] for i in images] == renders
    assert seen == [(v, 2.0 if v == "ema" else 5.0) for v in renders]  # the EMA's weights, then the trained ones back
    assert float(model.inner.lora_A.weight[0, 0]) == 5.0


def test_disk_estimate_counts_the_ema():
    from flux2_lora_pack.trainer.preflight import estimate_run_bytes

    common = dict(lora_numel=1000, max_train_steps=10, checkpointing_steps=5, checkpoints_total_limit=None,
                  existing_checkpoints=0, validation_images=0, validation_pixels=0)
    plain, ema = estimate_run_bytes(**common), estimate_run_bytes(**common, ema=True)
    assert ema.checkpoint_bytes - plain.checkpoint_bytes == 1000 * 4  # the fp32 average in each checkpoint
    assert ema.lora_bytes == 2 * plain.lora_bytes  # and <output_name>_ema.safetensors beside the LoRA
