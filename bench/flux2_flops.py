"""Analytic FLOPs of one FLUX.2 LoRA training step (forward + backward), per block, with TREAD and checkpointing.

Counted: every Linear of the blocks (2 * in * out per token), attention (QK^T and AV: 4 * S^2 * hidden), the
LoRA branches (2 * rank * (in + out) per token and adapted layer), and the token-wise input/output
projections (x_embedder, context_embedder, proj_out). Not counted: norms, RoPE, modulation, SwiGLU and other
elementwise work, and the per-sample embeddings (a few hidden^2 per sample).

Backward, with the base frozen: a base Linear needs only its input gradient (1x its forward), a LoRA branch
its input and weight gradients (2x), attention dQ, dK, dV through the saved probabilities (2x: four matmuls
against the forward's two). Checkpointed blocks run their forward again in backward: that is counted in
`hardware` only (`model` FLOPs, the MFU convention, count each forward once).
Used by bench/tread_speed.py and bench/gpu_step.py.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True, slots=True)
class Shape:
    """The transformer's sizes (Flux2Transformer2DModel's config keys)."""

    hidden: int
    num_double: int
    num_single: int
    mlp_ratio: float = 3.0
    in_channels: int = 128
    joint_attention_dim: int = 15360

    @classmethod
    def from_config(cls, config) -> Shape:
        return cls(hidden=config["num_attention_heads"] * config["attention_head_dim"], num_double=config["num_layers"],
                   num_single=config["num_single_layers"], mlp_ratio=config["mlp_ratio"],
                   in_channels=config["in_channels"], joint_attention_dim=config["joint_attention_dim"])

    @property
    def num_blocks(self) -> int:
        return self.num_double + self.num_single


def _layers(shape: Shape, *, double: bool) -> dict[str, list[tuple[int, int]]]:
    """(in, out) of each Linear per stream: 'image' and 'text' (double) or 'joint' (single)."""
    d, m = shape.hidden, int(shape.hidden * shape.mlp_ratio)
    if double:
        stream = [(d, d)] * 4 + [(d, 2 * m), (m, d)]  # q, k, v, out; ff in (gate + up), ff out
        return {"image": stream, "text": stream}
    return {"joint": [(d, 3 * d + 2 * m), (d + m, d)]}  # to_qkv_mlp_proj, to_out


def block_flops(shape: Shape, *, double: bool, image_tokens: int, text_tokens: int, lora_rank: int) -> dict[str, float]:
    """Forward and backward FLOPs of one block over image_tokens + text_tokens (per sample), all layers adapted."""
    tokens = {"image": image_tokens, "text": text_tokens, "joint": image_tokens + text_tokens}
    base = lora = 0.0
    for stream, layers in _layers(shape, double=double).items():
        for fan_in, fan_out in layers:
            base += 2.0 * fan_in * fan_out * tokens[stream]
            lora += 2.0 * lora_rank * (fan_in + fan_out) * tokens[stream]
    seq = image_tokens + text_tokens
    attention = 4.0 * seq * seq * shape.hidden
    forward = base + lora + attention
    backward = base + 2.0 * lora + 2.0 * attention
    return {"forward": forward, "backward": backward, "attention_forward": attention}


def step_flops(shape: Shape, *, image_tokens: int, text_tokens: int, lora_rank: int, batch: int = 1,
               routes: tuple[tuple[int, int, int], ...] = (), checkpoint_every: int | None = None) -> dict[str, float]:
    """FLOPs of one training step. routes: (start, end, kept_image_tokens) per route, blocks inclusive.

    Returns model (forward + backward), hardware (plus recomputed forwards) and forward.
    """
    kept = {}
    for start, end, count in routes:
        for block in range(start, end + 1):
            kept[block] = count
    forward = backward = recompute = 0.0
    for block in range(shape.num_blocks):
        cost = block_flops(shape, double=block < shape.num_double, image_tokens=kept.get(block, image_tokens),
                           text_tokens=text_tokens, lora_rank=lora_rank)
        forward += cost["forward"]
        backward += cost["backward"]
        if checkpoint_every is not None and block % checkpoint_every == 0:
            recompute += cost["forward"]
    d = shape.hidden
    embed = 2.0 * (image_tokens * shape.in_channels * d + text_tokens * shape.joint_attention_dim * d)
    head = 2.0 * image_tokens * d * shape.in_channels
    forward += embed + head
    backward += head  # the embedders' inputs and weights need no gradient
    return {"model": batch * (forward + backward), "hardware": batch * (forward + backward + recompute),
            "forward": batch * forward}
