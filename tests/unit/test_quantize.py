"""optimum-quanto weight quantization under LoRA, on the tiny FLUX.2 (2 double + 3 single blocks).

int8 runs by default; int4 compiles quanto's C++ extension on first use (minutes) and is marked slow.
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
    TrainConfig,
)
from flux2_lora_pack.trainer.model import build_model
from flux2_lora_pack.trainer.lora import apply_lora, lora_state_dict, lora_target_modules
from flux2_lora_pack.trainer.model_files import (
    inspect_model_folder,
    load_text_encoder,
    load_tokenizer,
    load_transformer,
)
from flux2_lora_pack.trainer.parallelize import DistEnv
from flux2_lora_pack.trainer.quantize import (
    apply_quantization,
    apply_text_encoder_quantization,
    quantized_module_names,
    text_encoder_quantization_targets,
)

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
OUTSIDE_BLOCKS = {
    "x_embedder", "context_embedder", "proj_out", "norm_out.linear", "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.linear", "single_stream_modulation.linear",
    "time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
    "time_guidance_embed.guidance_embedder.linear_1", "time_guidance_embed.guidance_embedder.linear_2",
}


def _quant(precision: str = "int8-quanto", *, dtype: str = "fp32", via: str = "cpu") -> QuantizationConfig:
    return QuantizationConfig(base_model_precision=precision, text_encoder_precision="no_change",
                                base_model_default_dtype=dtype, quantize_via=via)


LORA = LoraConfig(rank=4, alpha=2.0, dropout=0.0, init="default", target="all")


def _inputs(batch: int = 1) -> dict:
    g = torch.Generator().manual_seed(3)
    return {"hidden_states": torch.randn(batch, 16, 128, generator=g),
            "encoder_hidden_states": torch.randn(batch, 512, 96, generator=g),
            "timestep": torch.full((batch,), 0.4), "guidance": torch.ones(batch),
            "img_ids": flux2.image_position_ids(batch, 4, 4), "txt_ids": flux2.text_position_ids(batch, 512),
            "return_dict": False}


def _randomize_lora_b(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.02)


def test_quantizes_exactly_the_block_linears_and_keeps_the_rest_in_the_default_dtype(tiny_model_dir):
    model = load_transformer(inspect_model_folder(tiny_model_dir), precision="bf16")
    names = apply_quantization(model, precision="int8-quanto", default_dtype="bf16", quantize_via="cpu")
    # On FLUX.2 every Linear inside a block is a LoRA target of the "all" preset: the same 30 modules.
    assert set(names) == set(lora_target_modules(model, preset="all")) == quantized_module_names(model)
    assert len(names) == 30
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears - set(names) == OUTSIDE_BLOCKS
    from optimum.quanto import WeightQBytesTensor

    for name in names:
        weight = model.get_submodule(name).weight
        assert isinstance(weight, WeightQBytesTensor) and weight._data.dtype == torch.int8
    plain = {n: p for n, p in model.named_parameters() if not isinstance(p, WeightQBytesTensor)}
    assert {p.dtype for p in plain.values()} == {torch.bfloat16}  # norms, biases, everything outside blocks
    assert not any(p.requires_grad for p in model.parameters())


def test_default_dtype_fp32_keeps_unquantized_layers_in_fp32(tiny_model_dir):
    model = load_transformer(inspect_model_folder(tiny_model_dir), precision="fp32")
    apply_quantization(model, precision="int8-quanto", default_dtype="fp32", quantize_via="cpu")
    assert model.proj_out.weight.dtype == torch.float32 and model.x_embedder.weight.dtype == torch.float32
    assert model.transformer_blocks[0].attn.norm_q.weight.dtype == torch.float32


@pytest.mark.parametrize("via, expected", [
    ("accelerator", ["to", "quantized"]),  # moved to the training device, then rounded there
    ("cpu", ["quantized", "to"]),  # rounded in CPU memory, then the quantized block moves
])
def test_quantize_via_decides_where_each_block_is_quantized(tiny_model_dir, via, expected):
    model = load_transformer(inspect_model_folder(tiny_model_dir), precision="fp32")
    events: dict[str, list[str]] = {}
    blocks = {f"transformer_blocks.{i}": b for i, b in enumerate(model.transformer_blocks)}
    blocks |= {f"single_transformer_blocks.{i}": b for i, b in enumerate(model.single_transformer_blocks)}
    for name, block in blocks.items():
        original = block.to

        def recording_to(*args, _name=name, _original=original, **kwargs):
            events.setdefault(_name, []).append("to")
            return _original(*args, **kwargs)

        block.to = recording_to
    apply_quantization(model, precision="int8-quanto", default_dtype="fp32", quantize_via=via, device="cpu",
                       on_block=lambda name, block: events.setdefault(name, []).append("quantized"))
    assert events == {name: expected for name in blocks}


def test_quantized_base_with_lora_trains_and_only_lora_requires_grad(tiny_model_dir):
    model = build_model(inspect_model_folder(tiny_model_dir), lora=LORA, memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=True), parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, quantization=_quant())
    trainable = {n for n, p in model.inner.named_parameters() if p.requires_grad}
    plain = load_transformer(inspect_model_folder(tiny_model_dir), precision="fp32")
    targets = set(lora_target_modules(plain, preset="all"))
    apply_lora(plain, preset="all", rank=4, alpha=2.0)
    assert trainable == {n for n, p in plain.named_parameters() if p.requires_grad}  # same names as unquantized
    assert all("lora_A" in n or "lora_B" in n for n in trainable) and len(trainable) == 60
    # LoRA wraps quanto's QLinear as its base layer: every target is quantized underneath its adapter.
    assert quantized_module_names(model.inner) == {f"{t}.base_layer" for t in targets}
    _randomize_lora_b(model.inner)
    loss = model.module(**_inputs())[0].float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.inner.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), [n for n, g in grads.items()
                                                                              if g is None or g.abs().sum() == 0]


def test_int8_base_tracks_the_full_precision_base(tiny_model_dir):
    folder = inspect_model_folder(tiny_model_dir)
    full = load_transformer(folder, precision="fp32")
    quant = load_transformer(folder, precision="fp32")
    apply_quantization(quant, precision="int8-quanto", default_dtype="fp32", quantize_via="cpu")
    with torch.no_grad():
        a, b = full(**_inputs())[0], quant(**_inputs())[0]
    # int8 per-channel weights: a small relative error, nowhere near an unrelated output.
    assert (a - b).norm() / a.norm() < 0.05


def test_lora_trained_on_quantized_base_saves_comfy_keys_and_loads_on_unquantized_base(tiny_model_dir, tmp_path):
    from flux2_lora_pack.trainer.inference import LoraRef
    from flux2_lora_pack.trainer.lora_adapters import attached_loras
    from flux2_lora_pack.trainer.lora_keys import diffusers_to_comfy, lora_metadata, save_lora_file

    folder = inspect_model_folder(tiny_model_dir)
    model = build_model(folder, lora=LORA, memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=False), parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, quantization=_quant())
    optimizer = torch.optim.AdamW([p for p in model.inner.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model.module(**_inputs())[0].pow(2).mean().backward()
        optimizer.step()
    trained = {k.replace(".default", ""): v.detach().clone() for k, v in lora_state_dict(model.inner).items()}

    def save(state, name):
        comfy = diffusers_to_comfy(state, alpha=LORA.alpha, rank=LORA.rank, hidden_size=256)
        path = tmp_path / f"{name}.safetensors"
        meta = lora_metadata(rank=LORA.rank, alpha=LORA.alpha, targets="all", base_model="FLUX.2-dev", steps=2,
                             dataset_fingerprint="x")
        save_lora_file(path, state=comfy, metadata=meta, layout="comfyui")
        return path, comfy

    path, comfy = save(trained, "quantized")
    plain = load_transformer(folder, precision="fp32")
    apply_lora(plain, preset="all", rank=LORA.rank, alpha=LORA.alpha)
    _, comfy_plain = save({k.replace(".default", ""): v for k, v in lora_state_dict(plain).items()}, "plain")
    assert set(comfy) == set(comfy_plain)  # the same ComfyUI/BFL keys as a run on an unquantized base
    assert all(k.startswith("diffusion_model.") for k in comfy)

    base = load_transformer(folder, precision="fp32")
    with torch.no_grad():
        reference = base(**_inputs())[0]
    with attached_loras(base, loras=[LoraRef(path=str(path))]), torch.no_grad():
        adapted = base(**_inputs())[0]
        loaded = {k.replace(".flux2lora_0", ""): v for k, v in base.state_dict().items() if "flux2lora_0" in k}
    for name, tensor in trained.items():
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0)  # exactly the trained weights
    assert (adapted - reference).abs().max() > 1e-4  # and they act on the unquantized base


def test_lora_before_quantization_is_refused(tiny_model_dir):
    model = load_transformer(inspect_model_folder(tiny_model_dir), precision="fp32")
    apply_lora(model, preset="tiny", rank=2, alpha=2)
    with pytest.raises(ValueError, match="apply_quantization must run before apply_lora"):
        apply_quantization(model, precision="int8-quanto", default_dtype="fp32")


@pytest.mark.parametrize("kwargs, match", [
    ({"distributed": "fsdp2", "world_size": 2}, r"distributed 'fsdp2'.*full-precision shards"),
    ({"group_offload": True}, r"enable_group_offload"),
    ({"mixed_precision": "no"}, r"base_model_default_dtype 'bf16' with mixed_precision 'no'"),
])
def test_check_quantization_refuses_what_cannot_run(kwargs, match):
    with pytest.raises(ValueError, match=match):
        check_quantization(base_model_precision="int8-quanto", **kwargs)


def test_check_quantization_allows_ddp_none_and_single_process_fsdp2():
    def allowed(distributed: str, world: int) -> bool:
        try:
            check_quantization(base_model_precision="int8-quanto", distributed=distributed, world_size=world)
        except ValueError:
            return False
        return True

    layouts = (("ddp", 2), ("none", 1), ("fsdp2", 1), ("fsdp2", 2))
    # One process has nothing to shard; FSDP2 over several would turn quanto's weights back into full precision.
    assert [layout for layout in layouts if allowed(*layout)] == [("ddp", 2), ("none", 1), ("fsdp2", 1)]


def check_quantization(*, base_model_precision: str, text_encoder_precision: str = "no_change",
                       mixed_precision: str = "bf16", distributed: str = "none", world_size: int = 1,
                       group_offload: bool = False, group_offload_text_encoder: bool = False) -> None:
    """The one rule, QuantizationConfig.check_compatible, asked with these settings."""
    quantization = QuantizationConfig(base_model_precision=base_model_precision,
                                      text_encoder_precision=text_encoder_precision)
    offload = OffloadConfig(enabled=group_offload or group_offload_text_encoder,
                            text_encoder=group_offload_text_encoder)
    quantization.check_compatible(mixed_precision=mixed_precision, distributed=distributed, world_size=world_size,
                                  offload=offload)


def test_text_encoder_quantization_refuses_group_offload():
    with pytest.raises(ValueError, match="text_encoder_1_precision 'int8-quanto' cannot be combined with "
                                         "group_offload_text_encoder"):
        check_quantization(base_model_precision="no_change", text_encoder_precision="int8-quanto",
                           group_offload_text_encoder=True)


def test_build_model_refuses_before_loading_weights(tiny_model_dir, monkeypatch):
    from flux2_lora_pack.trainer import model_files

    monkeypatch.setattr(model_files, "load_transformer", lambda *a, **k: pytest.fail("weights were loaded"))
    offload = OffloadConfig(enabled=True, offload_type="block_level", blocks_per_group=1, use_stream=False,
                              text_encoder=False, vae=False, during_startup=False)
    with pytest.raises(ValueError, match="enable_group_offload"):
        build_model(inspect_model_folder(tiny_model_dir), lora=LORA, memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=True), parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, quantization=_quant(), offload=offload)
    with pytest.raises(ValueError, match="mixed_precision 'no'"):
        build_model(inspect_model_folder(tiny_model_dir), lora=LORA, memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=True), parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, quantization=_quant(dtype="bf16"))


def test_config_refuses_fsdp2_and_group_offload_with_a_quantized_base(tiny_model_dir, tmp_path):
    manifest = tmp_path / "manifest.json"
    manifest.write_text("{}")
    base = {"pretrained_model_name_or_path": str(tiny_model_dir), "output_dir": str(tmp_path / "out"),
            "dataset_manifest": str(manifest), "base_model_precision": "int8-quanto"}
    with pytest.raises(ValueError, match=r"base_model_precision 'int8-quanto' cannot be combined with distributed "
                                         r"'fsdp2' over 2 processes.*set distributed to 'ddp'"):
        TrainConfig.from_dict(base | {"distributed": "fsdp2"}).check_processes(2)
    with pytest.raises(ValueError, match=r"cannot be combined with enable_group_offload"):
        TrainConfig.from_dict(base | {"distributed": "ddp", "enable_group_offload": True})
    TrainConfig.from_dict(base | {"distributed": "ddp"})


def test_quantized_text_encoder_targets_decoder_layers_and_tracks_full_precision(tiny_model_dir):
    folder = inspect_model_folder(tiny_model_dir)
    tokenizer = load_tokenizer(folder)
    full = load_text_encoder(folder, precision="fp32")
    quant = load_text_encoder(folder, precision="fp32")
    names = apply_text_encoder_quantization(quant, precision="int8-quanto", quantize_via="cpu")
    assert set(names) == quantized_module_names(quant) == set(text_encoder_quantization_targets(quant))
    assert names and all(n.startswith("model.language_model.layers.") for n in names)
    assert len(names) == 32 * 7  # q, k, v, o, gate, up, down in each of the 32 decoder layers
    prompts = ["a red square", "a blue circle on grass"]
    a = flux2.encode_prompts(full, tokenizer, prompts)
    b = flux2.encode_prompts(quant, tokenizer, prompts)
    assert a.shape == b.shape
    assert (a - b).norm() / a.norm() < 0.05


@pytest.mark.slow
def test_int4_base_with_lora_trains(tiny_model_dir):
    """int4 compiles optimum-quanto's C++ extension on first use (about 2 minutes on 2 cores)."""
    model = build_model(inspect_model_folder(tiny_model_dir), lora=LORA, memory=MemoryConfig(mixed_precision="no", gradient_checkpointing=True), parallelism=ParallelismConfig(distributed="none"), seed=0, env=CPU, quantization=_quant("int4-quanto"))
    from optimum.quanto import WeightQBitsTensor

    assert isinstance(model.inner.transformer_blocks[0].attn.to_q.base_layer.weight, WeightQBitsTensor)
    _randomize_lora_b(model.inner)
    loss = model.module(**_inputs())[0].float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.inner.parameters() if p.requires_grad)
