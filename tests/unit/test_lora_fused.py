"""The fused LoRA forward (trainer/lora_fused.py): PEFT's result and gradients, without PEFT's passes over the output."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch.utils._python_dispatch import TorchDispatchMode

from flux2_lora_pack.trainer.lora_fused import FusedLoraLinear, use_fused_forward

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from block_tools import tiny_inputs, tiny_transformer  # noqa: E402

IN, OUT, RANK = 24, 40, 4


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(IN, OUT)


def _pair(*, alpha: float, dropout: float = 0.0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(stock PEFT, fused) LoRA on the same Linear, with the same random A and B."""
    torch.manual_seed(0)
    base = _Net()
    stock, fused = copy.deepcopy(base), copy.deepcopy(base)
    config = dict(r=RANK, lora_alpha=alpha, lora_dropout=dropout, target_modules=["proj"])
    inject_adapter_in_model(LoraConfig(**config), stock)
    fused_config = LoraConfig(**config)
    use_fused_forward(fused_config)
    inject_adapter_in_model(fused_config, fused)
    assert type(stock.proj) is PeftLoraLinear and type(fused.proj) is FusedLoraLinear
    with torch.no_grad():
        stock.proj.lora_B["default"].weight.normal_()
        fused.load_state_dict(stock.state_dict())
    return stock, fused


def _run(model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = model(x) if isinstance(model, torch.nn.Linear) else model.proj(x)
    out.backward(grad.to(out.dtype))
    lora_a, lora_b = model.proj.lora_A["default"].weight, model.proj.lora_B["default"].weight
    return out.detach(), x.grad, lora_a.grad, lora_b.grad


@pytest.mark.parametrize("alpha", [RANK, 10.0])  # scale 1 and 2.5
def test_the_fused_forward_and_its_gradients_equal_peft(alpha):
    stock, fused = _pair(alpha=alpha)
    x, grad = torch.randn(2, 7, IN), torch.randn(2, 7, OUT)
    for got, want in zip(_run(fused, x, grad), _run(stock, x, grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_under_bf16_autocast_it_matches_peft_to_bf16_precision():
    stock, fused = _pair(alpha=8.0)
    x, grad = torch.randn(3, 5, IN), torch.randn(3, 5, OUT)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _run(fused, x, grad), _run(stock, x, grad)
    assert got[0].dtype == want[0].dtype == torch.bfloat16
    for g, w in zip(got, want):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=2e-2)


def test_dropout_draws_the_same_mask_as_peft():
    stock, fused = _pair(alpha=RANK, dropout=0.3)
    x, grad = torch.randn(2, 6, IN), torch.randn(2, 6, OUT)
    torch.manual_seed(5)
    want = _run(stock, x, grad)
    torch.manual_seed(5)
    got = _run(fused, x, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_disabled_merged_and_mixed_dtype_layers_take_pefts_own_path():
    stock, fused = _pair(alpha=RANK)
    x = torch.randn(2, 3, IN)
    with torch.no_grad():
        for model in (stock, fused):
            model.proj.enable_adapters(False)
        torch.testing.assert_close(fused.proj(x), stock.proj.base_layer(x))
        for model in (stock, fused):
            model.proj.enable_adapters(True)
            model.proj.merge()
        torch.testing.assert_close(fused.proj(x), stock.proj(x))
        for model in (stock, fused):
            model.proj.unmerge()
            model.proj.base_layer.to(torch.bfloat16)  # bf16 output + fp32 LoRA, no autocast: PEFT promotes
        want = stock.proj(x.bfloat16())
        got = fused.proj(x.bfloat16())
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)


class _ElementwiseCounter(TorchDispatchMode):
    """Counts elementwise mul/add ops whose output has the layer's output shape."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.count = shape, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mul, torch.ops.aten.add) and getattr(out, "shape", None) == self.shape:
            self.count += 1
        return out


def test_the_fused_layer_makes_no_elementwise_pass_over_its_output():
    stock, fused = _pair(alpha=10.0)
    x, grad = torch.randn(2, 7, IN), torch.randn(2, 7, OUT)
    counts = {}
    for name, model in (("stock", stock), ("fused", fused)):
        with _ElementwiseCounter(torch.Size([2, 7, OUT])) as counter:
            _run(model, x, grad)
        counts[name] = counter.count
    assert counts["stock"] >= 3  # forward scale and sum, backward scale
    assert counts["fused"] == 0


def test_training_injects_the_fused_layer_and_the_model_output_is_unchanged():
    fused_model = tiny_transformer(seed=0)  # apply_lora: the training injection
    layers = [m for m in fused_model.modules() if isinstance(m, PeftLoraLinear)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    stock_model = copy.deepcopy(fused_model)
    for module in stock_model.modules():
        if type(module) is FusedLoraLinear:
            module.__class__ = PeftLoraLinear  # the same parameters through PEFT's own forward
    inputs = {**tiny_inputs(batch=1, reference=False), "return_dict": False}
    with torch.no_grad():
        torch.testing.assert_close(fused_model(**inputs)[0], stock_model(**inputs)[0], rtol=1e-4, atol=1e-5)
