"""FLOPs of a FLUX.2 LoRA training step, counted from the transformer's real shapes (its diffusers config).

Counted: every matrix multiply, at 2 FLOPs per multiply-add. That covers every Linear (per token 2 x in x out;
the timestep, guidance and modulation layers once per sample), attention (QK^T, then the probabilities times V:
4 x S^2 x hidden per block for a sequence of S tokens) and each LoRA branch (2 x rank x (in + out) per token).
Norms, RoPE, SwiGLU, softmax, dropout, the loss and the optimizer are elementwise: a few FLOPs per value. They
are left out, and they cost well under 1 % of the matrix multiplies on FLUX.2-dev at 1024 px.

Backward with a frozen base (LoRA):
- A frozen Linear computes only the gradient of its input (dY W), which costs 1x its forward. Full training
  costs 2x, because it also computes dW = dY^T X, which a frozen weight never needs. Where the input needs no
  gradient it costs nothing: the first block's q/k/v projections read the frozen embedders' output.
- A LoRA branch computes both its weight gradients and the gradient through it: 2x its forward, less
  2 x rank x in per token where its input needs no gradient.
- Attention costs `attention_backward` x its forward wherever anything before it is trained. The fused GPU
  kernels (flash, memory-efficient, cuDNN) recompute the scores and take dV, dP, dQ, dK: 5 matmuls against the
  forward's 2, so ATTENTION_BACKWARD = 2.5, as torch.utils.flop_counter counts them. The math kernel keeps the
  probabilities: 4 matmuls, 2.0.
- The embedders (x_embedder, context_embedder, timestep, guidance, modulation, norm_out's linear) need no
  backward.

Gradient checkpointing of every N-th block runs those blocks' forward again in backward (`recompute`).
In a TREAD-routed block only the kept target tokens, the reference tokens and the text go through.

tests/unit/test_flops.py checks this against a hand count for a tiny config, and against
torch.utils.flop_counter.FlopCounterMode on the tiny model's real forward and backward. Pure arithmetic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ATTENTION_BACKWARD = 2.5
"""Attention backward / forward FLOPs of the fused GPU kernels (see the module doc); 2.0 for the math kernel."""

_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "patch_size": 1, "in_channels": 128, "out_channels": None, "num_layers": 8, "num_single_layers": 48,
    "attention_head_dim": 128, "num_attention_heads": 48, "joint_attention_dim": 15360,
    "timestep_guidance_channels": 256, "mlp_ratio": 3.0, "guidance_embeds": True,
}
"""Flux2Transformer2DModel's defaults (FLUX.2-dev), for keys a config.json leaves out."""

# (q/k/v, output projection, feed-forward in, feed-forward out) of each double-block stream, as trainer.lora names them.
_IMAGE_STREAM = (("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "ff.linear_in", "ff.linear_out")
_TEXT_STREAM = (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out",
                "ff_context.linear_in", "ff_context.linear_out")
_SINGLE_IN, _SINGLE_OUT = "attn.to_qkv_mlp_proj", "attn.to_out"


@dataclass(frozen=True, kw_only=True, slots=True)
class TransformerShape:
    """The sizes of a Flux2Transformer2DModel that its FLOPs depend on."""

    hidden: int
    """heads x head dim (6144 on FLUX.2-dev)."""
    num_double: int
    num_single: int
    mlp_hidden: int
    """Feed-forward width (hidden x mlp_ratio); the SwiGLU input layer has twice as many outputs."""
    in_channels: int
    out_channels: int
    """proj_out's outputs (patch_size^2 x out_channels)."""
    joint_attention_dim: int
    """Text features per token (context_embedder's input)."""
    timestep_channels: int
    guidance_embeds: bool

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> TransformerShape:
        """From a transformer config.json; keys it leaves out take diffusers' defaults."""
        get = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}.__getitem__
        hidden = int(get("num_attention_heads")) * int(get("attention_head_dim"))
        out = get("out_channels") or get("in_channels")
        return cls(hidden=hidden, num_double=int(get("num_layers")), num_single=int(get("num_single_layers")),
                   mlp_hidden=int(hidden * float(get("mlp_ratio"))), in_channels=int(get("in_channels")),
                   out_channels=int(get("patch_size")) ** 2 * int(out),
                   joint_attention_dim=int(get("joint_attention_dim")),
                   timestep_channels=int(get("timestep_guidance_channels")),
                   guidance_embeds=bool(get("guidance_embeds")))

    @property
    def num_blocks(self) -> int:
        return self.num_double + self.num_single


@dataclass(frozen=True, kw_only=True, slots=True)
class LoraShape:
    """Which layers of each block carry a LoRA branch, and its rank."""

    rank: int
    double_layers: frozenset[str]
    """Module names inside a double block (e.g. "attn.to_q"), as trainer.lora.preset_layers gives them."""
    single_layers: frozenset[str]

    @classmethod
    def preset(cls, name: str, *, rank: int) -> LoraShape:
        from .lora import preset_layers

        double, single = preset_layers(name)
        return cls(rank=rank, double_layers=frozenset(double), single_layers=frozenset(single))


NO_LORA = LoraShape(rank=0, double_layers=frozenset(), single_layers=frozenset())


@dataclass(frozen=True, kw_only=True, slots=True)
class Flops:
    """FLOPs of some work, split by kind."""

    forward: float = 0.0
    """Forwards that keep activations for backward (the training forward)."""
    backward: float = 0.0
    recompute: float = 0.0
    """Forwards that gradient checkpointing runs again during backward."""
    no_grad: float = 0.0
    """Forwards without gradients: scheduled sampling's rollout and ReflexFlow."""

    @property
    def model(self) -> float:
        """Forward + backward, each forward counted once: the MFU convention."""
        return self.forward + self.backward

    @property
    def total(self) -> float:
        """All of it: what the GPU computes."""
        return self.forward + self.backward + self.recompute + self.no_grad

    def __add__(self, other: Flops) -> Flops:
        return Flops(forward=self.forward + other.forward, backward=self.backward + other.backward,
                     recompute=self.recompute + other.recompute, no_grad=self.no_grad + other.no_grad)

    def scaled(self, factor: float) -> Flops:
        return Flops(forward=self.forward * factor, backward=self.backward * factor,
                     recompute=self.recompute * factor, no_grad=self.no_grad * factor)

    def as_dict(self) -> dict[str, float]:
        return {"forward": self.forward, "backward": self.backward, "recompute": self.recompute,
                "no_grad": self.no_grad, "total": self.total}


class _Counter:
    """Adds up one sample's forward and backward FLOPs, layer by layer, tracking which tensors need gradients."""

    def __init__(self, *, rank: int, attention_backward: float) -> None:
        self.rank, self.attention_backward = rank, attention_backward
        self.forward = self.backward = 0.0

    def linear(self, tokens: int, fan_in: int, fan_out: int, *, adapted: bool, input_grad: bool) -> bool:
        """A (possibly LoRA-adapted) frozen Linear over `tokens` tokens; returns whether its output needs a gradient."""
        forward = 2.0 * tokens * fan_in * fan_out
        backward = forward if input_grad else 0.0  # dX = dY W; a frozen W needs no dW
        if adapted and self.rank:
            lora_in, lora_out = 2.0 * tokens * self.rank * fan_in, 2.0 * tokens * self.rank * fan_out
            forward += lora_in + lora_out  # x A^T, then (x A^T) B^T
            backward += 2 * lora_out + lora_in + (lora_in if input_grad else 0.0)  # dB, d(xA^T), dA, [dX]
        self.forward += forward
        self.backward += backward
        return input_grad or (adapted and self.rank > 0)

    def attention(self, seq: int, hidden: int, *, needs_grad: bool) -> None:
        forward = 4.0 * seq * seq * hidden  # QK^T and PV over all heads
        self.forward += forward
        if needs_grad:
            self.backward += self.attention_backward * forward

    def per_sample(self, fan_in: int, fan_out: int) -> None:
        """A Linear on the per-sample embedding (no gradient ever flows into it)."""
        self.forward += 2.0 * fan_in * fan_out


def _double_block(c: _Counter, shape: TransformerShape, *, image: int, text: int, grads: tuple[bool, bool],
                  layers: frozenset[str]) -> tuple[bool, bool]:
    d, m = shape.hidden, shape.mlp_hidden
    streams = ((image, grads[0], _IMAGE_STREAM), (text, grads[1], _TEXT_STREAM))
    qkv_grad = False
    for tokens, grad, (qkv, _, _, _) in streams:
        for name in qkv:
            qkv_grad = c.linear(tokens, d, d, adapted=name in layers, input_grad=grad) or qkv_grad
    c.attention(image + text, d, needs_grad=qkv_grad)
    out = []
    for tokens, grad, (_, proj, ff_in, ff_out) in streams:
        residual = c.linear(tokens, d, d, adapted=proj in layers, input_grad=qkv_grad) or grad
        inner = c.linear(tokens, d, 2 * m, adapted=ff_in in layers, input_grad=residual)  # SwiGLU: gate + up
        out.append(c.linear(tokens, m, d, adapted=ff_out in layers, input_grad=inner) or residual)
    return out[0], out[1]


def _single_block(c: _Counter, shape: TransformerShape, *, tokens: int, grad: bool, layers: frozenset[str]) -> bool:
    d, m = shape.hidden, shape.mlp_hidden
    fused = c.linear(tokens, d, 3 * d + 2 * m, adapted=_SINGLE_IN in layers, input_grad=grad)  # q, k, v, SwiGLU in
    c.attention(tokens, d, needs_grad=fused)
    return c.linear(tokens, d + m, d, adapted=_SINGLE_OUT in layers, input_grad=fused) or grad


def sample_flops(shape: TransformerShape, *, lora: LoraShape, image_tokens: int, text_tokens: int,
                 reference_tokens: int = 0, routes: Sequence[tuple[int, int, int]] = (),
                 checkpoint_every: int | None = None, zero_reference_timestep: bool = False,
                 attention_backward: float = ATTENTION_BACKWARD) -> Flops:
    """One sample's training forward and backward (block_forward with gradients).

    image_tokens: target tokens; reference_tokens: the reference images' tokens after them. routes: TREAD's
    (first block, last block, kept target tokens), blocks counted over double then single blocks, both inclusive.
    checkpoint_every: None, or N to recompute blocks 0, N, 2N, ... in backward. zero_reference_timestep: the
    references are modulated as at timestep 0 (one more timestep embedding and two more modulations).
    """
    c = _Counter(rank=lora.rank, attention_backward=attention_backward)
    d, images = shape.hidden, image_tokens + reference_tokens
    kept = {block: count + reference_tokens for start, end, count in routes for block in range(start, end + 1)}
    # Inputs and per-sample embeddings: frozen, fed by data that needs no gradient.
    c.forward += 2.0 * images * shape.in_channels * d + 2.0 * text_tokens * shape.joint_attention_dim * d
    for _ in range(2 if zero_reference_timestep and reference_tokens else 1):
        for _ in range(2 if shape.guidance_embeds else 1):  # timestep (and guidance) embedder: linear_1, linear_2
            c.per_sample(shape.timestep_channels, d)
            c.per_sample(d, d)
        c.per_sample(d, 6 * d)  # double_stream_modulation_img
        c.per_sample(d, 3 * d)  # single_stream_modulation
    c.per_sample(d, 6 * d)  # double_stream_modulation_txt
    recompute = 0.0
    grads, joint = (False, False), False
    for block in range(shape.num_blocks):
        before = c.forward
        image = kept.get(block, images)
        if block < shape.num_double:
            grads = _double_block(c, shape, image=image, text=text_tokens, grads=grads, layers=lora.double_layers)
        else:
            joint = _single_block(c, shape, tokens=image + text_tokens, grad=joint or any(grads),
                                  layers=lora.single_layers)
        if checkpoint_every is not None and block % checkpoint_every == 0:
            recompute += c.forward - before
    c.per_sample(d, 2 * d)  # norm_out's scale and shift
    final = joint if shape.num_single else grads[0]  # proj_out reads the image tokens (references cut after it)
    c.linear(images, d, shape.out_channels, adapted=False, input_grad=final)
    return Flops(forward=c.forward, backward=c.backward, recompute=recompute)


def forward_flops(shape: TransformerShape, *, lora: LoraShape, image_tokens: int, text_tokens: int,
                  reference_tokens: int = 0, zero_reference_timestep: bool = False) -> float:
    """One sample's forward without gradients (rollout, validation): no routing, no checkpointing."""
    return sample_flops(shape, lora=lora, image_tokens=image_tokens, text_tokens=text_tokens,
                        reference_tokens=reference_tokens, zero_reference_timestep=zero_reference_timestep).forward


@dataclass(frozen=True, kw_only=True, slots=True)
class SampleTokens:
    """Tokens of one kind of training sample and how often it is drawn."""

    weight: float
    """Relative frequency (a dataset item's repeats)."""
    image_tokens: int
    reference_tokens: int = 0


def step_flops(shape: TransformerShape, *, lora: LoraShape, samples: Sequence[SampleTokens], text_tokens: int,
               batch_size: int, gradient_accumulation: int, routes: Sequence[tuple[int, int, float]] = (),
               checkpoint_every: int | None = None, rollout_forwards: float = 0.0,
               zero_reference_timestep: bool = False, attention_backward: float = ATTENTION_BACKWARD) -> Flops:
    """Expected FLOPs of one optimizer step on one process: gradient_accumulation micro-batches of batch_size samples
    drawn from `samples` by weight, plus rollout_forwards forwards without gradients per micro-batch (in samples:
    ScheduledSamplingConfig.expected_rollout_forwards).

    routes: TREAD's (first block, last block, selection_ratio); each sample keeps tread.kept_count of its target
    tokens.
    """
    from .tread import kept_count

    if not samples or sum(s.weight for s in samples) <= 0:
        raise ValueError("step_flops needs at least one sample kind with a positive weight.")
    total_weight = sum(s.weight for s in samples)
    train, no_grad = Flops(), 0.0
    for s in samples:
        share = s.weight / total_weight
        kept = [(start, end, kept_count(s.image_tokens, selection_ratio=ratio)) for start, end, ratio in routes]
        one = sample_flops(shape, lora=lora, image_tokens=s.image_tokens, reference_tokens=s.reference_tokens,
                           text_tokens=text_tokens, routes=kept, checkpoint_every=checkpoint_every,
                           zero_reference_timestep=zero_reference_timestep, attention_backward=attention_backward)
        train = train + one.scaled(share)
        no_grad += share * forward_flops(shape, lora=lora, image_tokens=s.image_tokens, text_tokens=text_tokens,
                                         reference_tokens=s.reference_tokens,
                                         zero_reference_timestep=zero_reference_timestep)
    micro = train.scaled(batch_size) + Flops(no_grad=no_grad * rollout_forwards)
    return micro.scaled(gradient_accumulation)
