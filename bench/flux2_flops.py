"""Analytic FLOPs of one FLUX.2 LoRA training step for the benchmarks: an adapter over trainer/flops.py.

trainer/flops.py is the single FLOP model. The preflight's time estimate uses it too, and
tests/unit/test_flops.py checks it against torch's FlopCounterMode. It counts every matmul: the Linears and the
LoRA branches of every block, attention (4 S^2 hidden per block), the embedders and proj_out, and the per-sample
modulation layers. A frozen Linear's backward is 1x its forward (input gradient only), and nothing for the first
q/k/v projections, whose input needs no gradient. A LoRA branch costs 2x, and attention backward 2.5x (the fused
GPU kernels recompute the scores). Elementwise work is not counted.

`model` counts each forward once (the MFU convention). `hardware` adds the forwards that checkpointing
recomputes. All-layers LoRA throughout. Used by bench/tread_speed.py, bench/gpu_step.py and bench/gpu_offload.py.

Until 2026-12 this file held its own count, with attention backward at 2x and input gradients counted for every
block. The FLOP columns of bench/RESULTS.md dated 2026-11-27 come from that count (see the note there).
"""

from __future__ import annotations

from trainer.flops import LoraShape, TransformerShape, sample_flops

Shape = TransformerShape
"""The transformer's sizes: Shape.from_config(Flux2Transformer2DModel config dict)."""


def step_flops(shape: TransformerShape, *, image_tokens: int, text_tokens: int, lora_rank: int, batch: int = 1,
               routes: tuple[tuple[int, int, int], ...] = (), checkpoint_every: int | None = None) -> dict[str, float]:
    """FLOPs of one training step. routes: (start, end, kept_image_tokens) per route, blocks inclusive.

    Returns model (forward + backward), hardware (plus recomputed forwards) and forward.
    """
    flops = sample_flops(shape, lora=LoraShape.preset("all", rank=lora_rank), image_tokens=image_tokens,
                         text_tokens=text_tokens, routes=routes, checkpoint_every=checkpoint_every)
    return {"model": batch * flops.model, "hardware": batch * (flops.model + flops.recompute),
            "forward": batch * flops.forward}
