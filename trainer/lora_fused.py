"""LoRA's forward with the scale and the sum folded into one matmul.

PEFT's LoRA Linear computes `result + lora_B(lora_A(dropout(x))) * scaling`: after the up-projection it makes two
more passes over the layer's whole output (the scaling, then the sum), and backward makes one more (the scaling's
gradient). Those passes are over the widest tensors in the block (FLUX.2's single blocks output 3 x hidden + 2 x
MLP width per token), and they cost memory bandwidth, not FLOPs. `torch.addmm(result, h, B^T, alpha=scaling)` does
the up-projection, the scaling and the sum in one BLAS call (its beta = 1 epilogue); backward gets the scale inside
the two small rank-r matmuls. Same parameters, same state dict, same result up to rounding (one rounding fewer).

The fused path covers what training uses: one plain LoRA adapter (no DoRA or other variant, no LoRA bias) with
every tensor in one dtype or under autocast. Anything else (merged or disabled adapters, per-sample adapter names,
mixed dtypes without autocast) goes through PEFT's own forward unchanged. bench/vs_diffusers_example.py measured the
gain (bench/README.md).
"""

from __future__ import annotations

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear


class FusedLoraLinear(PeftLoraLinear):
    """PEFT's LoRA Linear with the up-projection, scaling and residual sum in one addmm."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if args or kwargs or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        if any(name in getattr(self, "lora_variant", {}) or self.lora_B[name].bias is not None for name in adapters):
            return super().forward(x, *args, **kwargs)
        result = self.base_layer(x)
        result_dtype = result.dtype
        autocast = torch.is_autocast_enabled(x.device.type)
        for name in adapters:
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            scaling = self.scaling[name]
            h = lora_A(self.lora_dropout[name](self._cast_input_dtype(x, lora_A.weight.dtype)))
            if autocast or result.dtype == h.dtype == lora_B.weight.dtype:
                flat = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]),
                                   lora_B.weight.t(), alpha=scaling)
                result = flat.view(*result.shape[:-1], flat.shape[-1])
            else:  # mixed dtypes without autocast: PEFT's promotion rules, unchanged
                result = result + lora_B(h) * scaling
        return result.to(result_dtype)


def use_fused_forward(config) -> None:
    """Make PEFT build FusedLoraLinear for every Linear that `config` (a peft LoraConfig) adapts. PEFT's dynamic
    dispatch checks custom modules first; a quantized base layer that subclasses Linear is wrapped the same way."""
    config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
