"""torchao low-precision compute of the frozen base (base_model_precision fp8-torchao / int8-torchao) on CPU:
which Linears are swapped, LoRA trains on top, no weight gradient for the frozen base, the refusal on CPU and on
older GPUs before any weight loads, the config and the memory model. fp8 runs with torchao's emulation (float8
rounding in ordinary matmuls); int8 runs its real int8 matmul (torch._int_mm works on CPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("torchao", reason="fp8-torchao / int8-torchao need torchao (requirements-test.txt)")

from flux2_lora_pack.trainer import lowp_compute, memory, model_files, tread  # noqa: E402
from flux2_lora_pack.trainer.blocks import apply_block_forward  # noqa: E402
from flux2_lora_pack.trainer.config import (  # noqa: E402
    CHOICES,
    LoraConfig,
    MemoryConfig,
    OffloadConfig,
    ParallelismConfig,
    QuantizationConfig,
    TrainConfig,
)
from flux2_lora_pack.trainer.lora import apply_lora  # noqa: E402
from flux2_lora_pack.trainer.lowp_compute import (  # noqa: E402
    Float8ComputeLinear,
    Int8ComputeLinear,
    apply_lowp_compute,
    check_environment,
    lowp_module_names,
    lowp_targets,
)
from flux2_lora_pack.trainer.model import build_model  # noqa: E402
from flux2_lora_pack.trainer.model_files import inspect_model_folder  # noqa: E402
from flux2_lora_pack.trainer.parallelize import DistEnv  # noqa: E402
from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG  # noqa: E402

from block_tools import tiny_inputs  # noqa: E402

CLASSES = {"fp8-torchao": Float8ComputeLinear, "int8-torchao": Int8ComputeLinear}
# Relative error of the adapted model's output (fp32 reference) that each precision stays within on the tiny model.
OUTPUT_BAND = {"fp8-torchao": 0.1, "int8-torchao": 0.03}


def _base(seed: int = 0) -> Flux2Transformer2DModel:
    torch.manual_seed(seed)
    return Flux2Transformer2DModel(**TRANSFORMER_CONFIG).requires_grad_(False)


def _swapped(precision: str, seed: int = 0) -> Flux2Transformer2DModel:
    model = _base(seed)
    apply_lowp_compute(model, precision=precision, emulate=True)
    return model


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def test_the_choices_are_the_config_literal_and_each_has_its_tables():
    assert set(lowp_compute.LOWP_COMPUTE) <= set(CHOICES["base_model_precision"])
    assert set(lowp_compute.MIN_CAPABILITY) == set(lowp_compute.STORED_BYTES_PER_WEIGHT) == set(CLASSES)


@pytest.mark.parametrize("precision", list(CLASSES))
def test_swaps_exactly_the_block_linears_whose_dims_are_multiples_of_16(precision):
    model = _base()
    odd = torch.nn.Linear(24, 40)  # inside a block, but not a multiple of 16: torch._scaled_mm cannot take it
    model.single_transformer_blocks[0].add_module("odd", odd)
    block_linears = set(lowp_compute.block_linear_names(model))
    names = apply_lowp_compute(model, precision=precision, emulate=True)
    assert set(names) == set(lowp_targets(model)) == block_linears - {"single_transformer_blocks.0.odd"}
    assert lowp_module_names(model) == set(names)
    assert all(type(model.get_submodule(n)) is CLASSES[precision] for n in names)
    assert model.single_transformer_blocks[0].odd is odd
    # embedders, modulation, norm_out and proj_out keep plain Linears
    outside = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - block_linears
    assert outside and all(type(model.get_submodule(n)) is torch.nn.Linear for n in outside)
    assert "proj_out" in outside and "x_embedder" in outside


@pytest.mark.parametrize("precision", list(CLASSES))
def test_lora_trains_on_the_swapped_base_and_the_base_gets_no_gradient(precision):
    reference, model = _base(), _swapped(precision)
    targets = set(lowp_targets(reference))
    for m in (reference, model):
        apply_lora(m, preset="all", rank=4, alpha=4)
    model.load_state_dict(reference.state_dict(), strict=False)  # the same LoRA (int8 weights are not in both)
    with torch.no_grad():
        for (name, p), (_, q) in zip(reference.named_parameters(), model.named_parameters(), strict=True):
            if "lora_B" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
                q.copy_(p)
    wrapped = {n.removesuffix(".base_layer") for n, m in model.named_modules()
               if n.endswith(".base_layer") and isinstance(m, CLASSES[precision])}
    assert wrapped == targets  # PEFT's lora.Linear wraps each swapped layer as its base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)

    inputs = tiny_inputs()
    out = model(**inputs, return_dict=False)[0]
    expected = reference(**inputs, return_dict=False)[0]
    assert _rel(out, expected) < OUTPUT_BAND[precision]
    out.square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, name
        else:
            assert p.grad is None, name


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def _backward_matmuls(layer: torch.nn.Module) -> int:
    x = torch.randn(64, 128, requires_grad=True)
    out = layer(x)
    with _CountMatmuls() as counter:
        out.square().sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    return counter.count


def test_fp8_backward_computes_only_the_input_gradient():
    """torchao's Float8Linear computes (and autograd then drops) a frozen weight's gradient: 2 matmuls. Ours 1,
    as a frozen nn.Linear."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(0)
    plain = torch.nn.Linear(128, 256).requires_grad_(False)
    torchao_fp8 = convert_to_float8_training(torch.nn.Sequential(torch.nn.Linear(128, 256).requires_grad_(False)),
                                             config=Float8LinearConfig(emulate=True))
    ours = Float8ComputeLinear.from_linear(torch.nn.Linear(128, 256).requires_grad_(False), emulate=True)
    assert (_backward_matmuls(plain), _backward_matmuls(torchao_fp8), _backward_matmuls(ours)) == (1, 2, 1)


def test_fp8_matches_torchaos_float8_linear():
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 256).requires_grad_(False)
    theirs = Float8Linear.from_float(linear, config=Float8LinearConfig(emulate=True))
    ours = Float8ComputeLinear.from_linear(linear, emulate=True)
    assert ours.weight is linear.weight  # the weight itself, no copy
    x1 = torch.randn(2, 32, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    g = torch.randn(2, 32, 256)
    torch.testing.assert_close(ours(x1), theirs(x2), rtol=0, atol=0)
    ours(x1).backward(g)
    theirs(x2).backward(g)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_error_against_the_full_precision_linear(dtype):
    """W8A8 per channel / per token: forward and input gradient within 2% of the fp32 Linear (measured about 0.8%
    and 0.4% on this shape, about what bf16 weights alone cost: 0.4%)."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 384).requires_grad_(False)
    layer = Int8ComputeLinear.from_linear(linear)
    assert layer.weight.dtype == torch.int8 and not layer.weight.requires_grad
    assert _rel(layer.dequantized_weight(), linear.weight) < 0.01
    x = torch.randn(4, 96, 512, dtype=dtype, requires_grad=True)
    out = layer(x)
    assert out.dtype == dtype
    g = torch.randn_like(out)
    out.backward(g)
    ref_x = x.detach().float().requires_grad_()
    ref = linear(ref_x)
    ref.backward(g.float())
    assert _rel(out, ref) < 0.02
    assert _rel(x.grad, ref_x.grad) < 0.02


def test_int8_follows_autocast_like_a_linear():
    layer = Int8ComputeLinear.from_linear(torch.nn.Linear(64, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(20, 64)).dtype == torch.bfloat16


@pytest.mark.parametrize("precision", list(CLASSES))
def test_composes_with_tread_routing(precision):
    model = _swapped(precision)
    apply_lora(model, preset="all", rank=4, alpha=4)
    apply_block_forward(model.train(), routes=(tread.Route(start=1, end=3, selection_ratio=0.5),))
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    out = model(**tiny_inputs(), return_dict=False, tread_generators=gens, num_target_tokens=16)[0]
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_int8_loads_block_by_block_and_keeps_the_rest_in_the_default_dtype(tiny_model_dir):
    folder = inspect_model_folder(tiny_model_dir)
    model = lowp_compute.load_int8_transformer(folder, default_dtype="fp32", quantize_via="cpu", device="cpu")
    reference = model_files.load_transformer(folder, precision="fp32")
    assert lowp_module_names(model) == set(lowp_targets(reference))
    assert {p.dtype for n, p in model.named_parameters() if n not in {f"{m}.weight" for m in lowp_module_names(model)}} \
        == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        assert _rel(model(**tiny_inputs(), return_dict=False)[0], reference(**tiny_inputs(), return_dict=False)[0]) < 0.03


def test_applied_after_lora_is_refused():
    model = _base()
    apply_lora(model, preset="tiny", rank=2, alpha=2)
    with pytest.raises(ValueError, match="apply_lowp_compute must run before apply_lora"):
        apply_lowp_compute(model, precision="int8-torchao")


# --- refusals before any weight loads ----------------------------------------------------------------


@pytest.mark.parametrize("precision", list(CLASSES))
def test_refused_on_cpu_before_any_weight_loads(tiny_model_dir, monkeypatch, precision):
    def loaded(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    for name in ("load_transformer", "empty_transformer", "fill_from_safetensors"):
        monkeypatch.setattr(model_files, name, loaded)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=rf"base_model_precision '{precision}' needs a CUDA GPU with compute "
                                         r"capability >= 8\.\d, but this run trains on 'cpu'\. Set base_model_precision"):
        build_model(inspect_model_folder(tiny_model_dir), lora=LoraConfig(rank=2, alpha=2.0, target="tiny"),
                    memory=MemoryConfig(mixed_precision="bf16"), parallelism=ParallelismConfig(distributed="none"),
                    seed=0, env=env, quantization=QuantizationConfig(base_model_precision=precision))


@pytest.mark.parametrize(("precision", "capability", "match"), [
    ("fp8-torchao", (8, 6), r"needs compute capability >= 8\.9, but NVIDIA GeForce RTX 3090 \(cuda:0\) has 8\.6\. "
                            r"Set base_model_precision to 'int8-quanto' .* \('int8-torchao' runs from 8\.0\)"),
    ("fp8-torchao", (8, 0), r"compute capability >= 8\.9, but .* has 8\.0"),
    ("int8-torchao", (7, 5), r"'int8-torchao' needs compute capability >= 8\.0, but .* has 7\.5"),
])
def test_refused_on_an_older_gpu_with_the_device_and_the_way_out(monkeypatch, precision, capability, match):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(ValueError, match=match):
        check_environment(precision, device="cuda:0")


@pytest.mark.parametrize(("precision", "capability"), [("fp8-torchao", (8, 9)), ("fp8-torchao", (9, 0)),
                                                       ("int8-torchao", (8, 0)), ("int8-torchao", (12, 0))])
def test_accepted_on_a_gpu_that_has_the_kernels(monkeypatch, precision, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    check_environment(precision, device="cuda:0")


def test_a_missing_torchao_is_named(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchao" else real(name, *a))
    with pytest.raises(ValueError, match=r"'fp8-torchao' needs the Python package 'torchao'.*pip install torchao"):
        check_environment("fp8-torchao", device="cuda:0")
    check_environment("int8-quanto", device="cpu")  # other precisions do not need it


def test_launch_refuses_on_a_machine_without_the_gpu(tmp_path, monkeypatch):
    from flux2_lora_pack.trainer import run

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "model").mkdir()
    (tmp_path / "manifest.json").write_text("{}")
    config = TrainConfig.from_dict({"pretrained_model_name_or_path": str(tmp_path / "model"),
                                    "output_dir": str(tmp_path / "out"), "dataset_manifest": str(tmp_path / "manifest.json"),
                                    "base_model_precision": "int8-torchao", "distributed": "ddp", "optimizer": "adamw"})
    with pytest.raises(ValueError, match=r"'int8-torchao' needs a CUDA GPU .* trains on 'cpu'"):
        run.run_training(config, num_processes=1, owner="test")
    assert not (tmp_path / "out").exists()  # refused before anything was written


# --- config -----------------------------------------------------------------------------------------------


def _config(tmp_path, **keys) -> TrainConfig:
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "manifest.json").write_text("{}")
    return TrainConfig.from_dict({"pretrained_model_name_or_path": str(tmp_path / "model"),
                                  "output_dir": str(tmp_path / "out"), "dataset_manifest": str(tmp_path / "manifest.json"),
                                  **keys})


@pytest.mark.parametrize("precision", list(CLASSES))
def test_config_round_trip(tmp_path, precision):
    config = _config(tmp_path, base_model_precision=precision, distributed="ddp")
    assert config.quantization.base_model_precision == precision
    assert config.quantization.base_quantized is (precision == "int8-torchao")  # int8 weights are stored quantized
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_fp8_composes_with_fsdp2_and_int8_does_not(tmp_path):
    fp8 = _config(tmp_path, base_model_precision="fp8-torchao", distributed="fsdp2")
    fp8.check_processes(8)  # plain bf16 weights under the float8 compute: fully_shard shards them as usual
    int8 = _config(tmp_path, base_model_precision="int8-torchao", distributed="fsdp2")
    with pytest.raises(ValueError, match=r"'int8-torchao' cannot be combined with distributed 'fsdp2' over 2 "
                                         r"processes.*Use distributed 'ddp'"):
        int8.check_processes(2)


@pytest.mark.parametrize("precision", list(CLASSES))
def test_group_offload_is_refused(precision):
    with pytest.raises(ValueError, match=rf"'{precision}' cannot be combined with enable_group_offload"):
        QuantizationConfig(base_model_precision=precision).check_compatible(
            mixed_precision="bf16", distributed="none", world_size=1,
            offload=OffloadConfig(enabled=True))


def test_text_encoder_takes_the_quanto_choices_only(tmp_path):
    with pytest.raises(ValueError, match=r"text_encoder_1_precision must be one of .*the text encoder takes the quanto"):
        _config(tmp_path, text_encoder_1_precision="fp8-torchao")


# --- memory model -----------------------------------------------------------------------------------------


def test_memory_model_int8_stores_a_byte_and_fp8_keeps_bf16_weights():
    dev = memory.FLUX2_DEV_TRANSFORMER_CONFIG

    def weights(precision: str, **kw) -> float:
        return memory.estimate_peak_memory(dev, base_model_precision=precision, **kw).weights_gb

    counts = memory.count_transformer(dev, lora_rank=16, lora_target="all")
    assert weights("int8-torchao") == weights("int8-quanto")  # 1 byte a block weight, one dequantized Linear
    assert weights("fp8-torchao") == pytest.approx(weights("no_change") + counts.largest_linear / memory.GB)
    assert weights("int8-torchao") < 0.6 * weights("no_change")
    host = memory.estimate_host_memory(dev, base_model_precision="int8-torchao")
    assert host.load_gb == memory.estimate_host_memory(dev, base_model_precision="int8-quanto").load_gb


def test_init_lokr_norm_reads_int8_weights_with_their_scales(tmp_path):
    """SimpleTuner's init_lokr_norm draws LoKr w2 like the base weight: an int8-torchao base is read dequantized."""
    import json

    from flux2_lora_pack.trainer.lokr import apply_init_lokr_norm, apply_lokr, read_lycoris_config

    path = tmp_path / "lycoris_config.json"
    path.write_text(json.dumps({"algo": "lokr", "multiplier": 1.0, "full_matrix": True, "linear_dim": 10000,
                                "linear_alpha": 1, "factor": 4}))
    spec = read_lycoris_config(path)
    w2 = {}
    for precision in ("no_change", "int8-torchao"):
        model = _base() if precision == "no_change" else _swapped(precision)
        apply_lokr(model, spec=spec, preset="all", init_lokr_norm=1e-3)
        apply_init_lokr_norm(model, scale=1e-3, seed=5)
        w2[precision] = model.get_submodule("transformer_blocks.0.attn.to_q").lokr_w2["default"].detach()
    assert w2["int8-torchao"].std() == pytest.approx(float(w2["no_change"].std()), rel=0.02)
