"""Group offload of the training transformer (frozen block weights only) and of the caching encoders.

On this CPU-only machine the onload device is the CPU: every hook and transfer call runs, so these tests
prove correctness (same loss and LoRA gradients as without offload, the right tensors in the groups, one
transfer per group per forward and per recompute), not the memory effect, which needs an accelerator.
"""

from __future__ import annotations

import pytest
import torch

from flux2_lora_pack.trainer import flux2
from flux2_lora_pack.trainer.config import (
    LoraConfig,
    MemoryConfig,
    OffloadConfig,
    ParallelismConfig,
    QuantizationConfig,
)
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.model_files import (
    inspect_model_folder,
    load_text_encoder,
    load_tokenizer,
    load_vae,
)
from flux2_lora_pack.trainer.offload import apply_encoder_offload, check_encoders, onloaded
from flux2_lora_pack.trainer.parallelize import DistEnv

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
LORA = LoraConfig(rank=4, alpha=4.0, dropout=0.0, init="default", target="all")


def _settings(**kw) -> OffloadConfig:
    values = {"enabled": True, "offload_type": "block_level", "blocks_per_group": 1, "use_stream": False,
              "text_encoder": False, "vae": False, "during_startup": False} | kw
    return OffloadConfig(**values)


def check_offload(settings: OffloadConfig, *, device: str, distributed: str, world_size: int,
                  gradient_checkpointing: bool, quantized: bool) -> None:
    """The rules as the trainer asks them: OffloadConfig.check_compatible, and quantization's own rule."""
    if quantized:
        QuantizationConfig(base_model_precision="int8-quanto", base_model_default_dtype="fp32").check_compatible(
            mixed_precision="no", distributed="none", world_size=1, offload=settings)
    settings.check_compatible(gradient_checkpointing=gradient_checkpointing, distributed=distributed,
                              world_size=world_size, device=device)


def _inputs(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(5)
    return {"hidden_states": torch.randn(batch, 16, 128, generator=g),
            "encoder_hidden_states": torch.randn(batch, 512, 96, generator=g),
            "timestep": torch.full((batch,), 0.6), "guidance": torch.ones(batch),
            "img_ids": flux2.image_position_ids(batch, 4, 4), "txt_ids": flux2.text_position_ids(batch, 512),
            "return_dict": False}


def _step(model, optimizer) -> tuple[float, dict[str, torch.Tensor]]:
    optimizer.zero_grad(set_to_none=True)
    loss = model.module(**_inputs())[0].pow(2).mean()
    loss.backward()
    loss = loss.detach()
    grads = {n: p.grad.detach().clone() for n, p in model.inner.named_parameters() if p.requires_grad}
    optimizer.step()
    return float(loss), grads


def _build(folder, offload=None, checkpointing=True):
    model = build_model(folder, lora=LORA, memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=checkpointing), parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, offload=offload)
    with torch.no_grad():  # B starts at zero: give it values so every LoRA gradient is non-zero
        for name, param in model.inner.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)
    return model, torch.optim.AdamW([p for p in model.inner.parameters() if p.requires_grad], lr=1e-2)


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """Losses and LoRA gradients of two optimizer steps without offload."""
    model, optimizer = _build(inspect_model_folder(tiny_model_dir))
    return [_step(model, optimizer) for _ in range(2)]


@pytest.mark.parametrize("offload_type, per_group, groups", [
    ("block_level", 1, 5), ("block_level", 2, 3), ("leaf_level", 1, None),
])
def test_offload_gives_the_same_losses_and_lora_gradients(tiny_model_dir, reference, offload_type, per_group, groups):
    model, optimizer = _build(inspect_model_folder(tiny_model_dir),
                              offload=_settings(offload_type=offload_type, blocks_per_group=per_group))
    hook = model.inner._diffusers_hook.get_hook("flux2_lora_group_offload_reset")
    schedule = hook.schedule
    if groups is not None:
        assert len(schedule.groups) == groups
    for expected in reference:
        onloads_before = schedule.onloads
        loss, grads = _step(model, optimizer)
        assert loss == pytest.approx(expected[0], rel=0, abs=0)
        assert grads.keys() == expected[1].keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, expected[1][name], rtol=0, atol=0)
            assert grad.abs().sum() > 0, name
        # Each group is moved in for the forward and again for the checkpointed recompute in backward.
        assert schedule.onloads - onloads_before == 2 * len(schedule.groups)
        # Never more than one group on the device; the last one recomputed goes back when the next forward starts.
        assert schedule.peak_onloaded == 1 and len(schedule.onloaded) <= 1


def test_groups_hold_exactly_the_frozen_block_weights(tiny_model_dir):
    model, _ = _build(inspect_model_folder(tiny_model_dir), offload=_settings(blocks_per_group=2))
    inner = model.inner
    schedule = inner._diffusers_hook.get_hook("flux2_lora_group_offload_reset").schedule
    in_groups = {id(p) for g in schedule.groups for p in g.parameters}
    names = {n for n, p in inner.named_parameters() if id(p) in in_groups}
    block_frozen = {n for n, p in inner.named_parameters()
                    if n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks") and not p.requires_grad}
    assert names == block_frozen
    assert not any(p.requires_grad for g in schedule.groups for p in g.parameters)  # LoRA never moves
    assert sorted(inner._ddp_params_and_buffers_to_ignore) == sorted(block_frozen)  # DDP leaves them alone
    assert all(g.offload_to_disk_path is None for g in schedule.groups)  # never disk offload (training)
    assert schedule.sizes == [2, 2, 1]


def test_offload_also_runs_the_validation_forward_without_grad(tiny_model_dir, reference):
    model, _ = _build(inspect_model_folder(tiny_model_dir), offload=_settings())
    plain, _ = _build(inspect_model_folder(tiny_model_dir))
    model.inner.eval()
    plain.inner.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.module(**_inputs())[0], plain.module(**_inputs())[0], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"settings": _settings(use_stream=True)}, r"group_offload_use_stream is true but this process computes on 'cpu'"),
    ({"quantized": True}, r"cannot be combined with a quantized base_model_precision"),
    ({"distributed": "fsdp2", "world_size": 2}, r"cannot be combined with distributed 'fsdp2' over 2 processes"),
    ({"gradient_checkpointing": False}, r"enable_group_offload needs gradient_checkpointing true"),
])
def test_check_offload_refuses_what_cannot_work(kwargs, match):
    args = {"settings": _settings(), "device": "cpu", "distributed": "none", "world_size": 1,
            "gradient_checkpointing": True, "quantized": False} | kwargs
    settings = args.pop("settings")
    with pytest.raises(ValueError, match=match):
        check_offload(settings, **args)


def _allowed(settings: OffloadConfig, **kwargs) -> bool:
    try:
        check_offload(settings, **kwargs)
    except ValueError:
        return False
    return True


def test_check_offload_allows_ddp_and_single_process_fsdp2():
    layouts = (("ddp", 2), ("none", 1), ("fsdp2", 1), ("fsdp2", 2))
    allowed = [(distributed, world) for distributed, world in layouts
               if _allowed(_settings(), device="cpu", distributed=distributed, world_size=world,
                           gradient_checkpointing=True, quantized=False)]
    assert allowed == [("ddp", 2), ("none", 1), ("fsdp2", 1)]  # FSDP2 over several processes owns placement
    # Off: nothing to check, whatever else is set.
    assert _allowed(_settings(enabled=False, use_stream=True), device="cpu", distributed="fsdp2", world_size=8,
                    gradient_checkpointing=False, quantized=True)


def test_build_model_refuses_stream_on_cpu_before_loading(tiny_model_dir, monkeypatch):
    from flux2_lora_pack.trainer import model_files

    monkeypatch.setattr(model_files, "load_transformer", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(ValueError, match="group_offload_use_stream"):
        build_model(inspect_model_folder(tiny_model_dir), lora=LORA, memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=True), parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, offload=_settings(use_stream=True))


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level"])
def test_offloaded_encoders_compute_the_same_embeddings_and_latents(tiny_model_dir, offload_type):
    folder = inspect_model_folder(tiny_model_dir)
    tokenizer = load_tokenizer(folder)
    prompts = ["a red square", "two blue circles"]
    expected = flux2.encode_prompts(load_text_encoder(folder, precision="fp32"), tokenizer, prompts)
    text_encoder = load_text_encoder(folder, precision="fp32")
    apply_encoder_offload(text_encoder, kind="text_encoder", device="cpu", offload_type=offload_type,
                          blocks_per_group=4, use_stream=False)
    hooked = text_encoder.model.language_model.layers[0]
    if offload_type == "leaf_level":
        hooked = hooked.self_attn.q_proj
    assert hasattr(hooked, "_diffusers_hook")  # the hooks reach the decoder layers (not one group for all)
    torch.testing.assert_close(flux2.encode_prompts(text_encoder, tokenizer, prompts), expected, rtol=0, atol=0)

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected_latents = flux2.encode_images(load_vae(folder), images)
    vae = load_vae(folder)
    apply_encoder_offload(vae, kind="vae", device="cpu", offload_type=offload_type, blocks_per_group=1,
                          use_stream=False)
    with torch.no_grad():
        torch.testing.assert_close(flux2.encode_images(vae, images), expected_latents, rtol=0, atol=0)


def test_encoder_settings_from_config_follow_enable_group_offload(tiny_model_dir, tmp_path):
    from flux2_lora_pack.trainer.config import TrainConfig

    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    base = {"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "o"),
            "dataset_manifest": str(manifest), "group_offload_text_encoder": True, "group_offload_vae": True,
            "text_encoder_1_precision": "int8-quanto", "quantize_via": "cpu", "offload_during_startup": True}
    off = TrainConfig.from_dict(base)
    assert (off.offload.offloads_text_encoder, off.offload.offloads_vae) == (False, False)  # "also": only with enable_group_offload
    assert (off.quantization.text_encoder_precision, off.quantization.quantize_via, off.offload.during_startup) == ("int8-quanto", "cpu", True)
    on = TrainConfig.from_dict(base | {"enable_group_offload": True, "text_encoder_1_precision": "no_change"})
    assert (on.offload.offloads_text_encoder, on.offload.offloads_vae) == (True, True)
    assert off.quantization.text_cache_tag("bf16") == "bf16+int8-quanto" and on.quantization.text_cache_tag("bf16") == "bf16"
    with pytest.raises(ValueError, match="group_offload_use_stream"):
        check_encoders(quantization=QuantizationConfig(), offload=OffloadConfig(enabled=True, vae=True, use_stream=True),
                       device="cpu")


def test_offload_during_startup_keeps_the_validation_vae_on_cpu_between_uses():
    moves: list[str] = []

    class Recorder(torch.nn.Module):
        def to(self, *args, **kwargs):
            moves.append(str(args[0]))
            return self

    vae = Recorder()
    with onloaded(vae, device="cuda:0", offload=OffloadConfig(during_startup=True)):
        moves.append("decode")
    with onloaded(vae, device="cuda:0", offload=OffloadConfig(during_startup=False)):
        moves.append("decode-resident")
    assert moves == ["cuda:0", "decode", "cpu", "decode-resident"]


def test_build_dataset_uses_the_encoder_settings(tiny_model_dir, tmp_path, monkeypatch):
    """vae_batch_size, text_encoder_1_precision and group_offload_* reach the encoders in build_dataset."""
    from flux2_lora_pack.trainer import offload
    from flux2_lora_pack.trainer.build import build_dataset
    from flux2_lora_pack.trainer.build_report import load_build_report
    from flux2_lora_pack.trainer.sample_data import make_sample_dataset

    images = make_sample_dataset(out_dir=tmp_path / "images", count=3)
    batches: list[int] = []
    original = flux2.encode_images
    monkeypatch.setattr(flux2, "encode_images", lambda vae, x: batches.append(x.shape[0]) or original(vae, x))
    offloaded: list[str] = []
    original_offload = offload.apply_encoder_offload
    monkeypatch.setattr(offload, "apply_encoder_offload",
                        lambda module, **kw: offloaded.append(kw["kind"]) or original_offload(module, **kw))
    settings = OffloadConfig(enabled=True, text_encoder=True, vae=True, blocks_per_group=8)
    build_dataset(image_dir=images, model=inspect_model_folder(tiny_model_dir), out_dir=tmp_path / "a",
                  resolution=32, text_precision="fp32", vae_batch_size=2, offload=settings)
    assert batches == [2, 1] and offloaded == ["vae", "text_encoder"]
    # A quantized text encoder writes its own cache entries (other embeddings), the latents are reused.
    report = load_build_report(
        build_dataset(image_dir=images, model=inspect_model_folder(tiny_model_dir), out_dir=tmp_path / "a",
                      resolution=32, text_precision="fp32",
                      quantization=QuantizationConfig(text_encoder_precision="int8-quanto")).parent)
    assert report.latents_reused == 3 and report.prompts_reused == 0 and report.prompts_encoded > 0
