"""trainer/flops.py: the FLOP count of a training step against a hand count and against torch's FlopCounterMode on the
tiny model's real forward and backward; the step average; scheduled sampling's expected rollout forwards."""

from __future__ import annotations

import pytest
import torch
from flux2_lora_pack.trainer import blocks, flops, tread
from flux2_lora_pack.trainer.scheduled_sampling import (
    SAMPLER_EVALUATIONS,
    ScheduledSamplingConfig,
)
from flux2_lora_pack.trainer.tiny import TRANSFORMER_CONFIG

# hidden 2, MLP 4, one double and one single block, no guidance embedding: small enough to count by hand.
HAND = flops.TransformerShape(hidden=2, num_double=1, num_single=1, mlp_hidden=4, in_channels=3, out_channels=3,
                              joint_attention_dim=5, timestep_channels=2, guidance_embeds=False)


def test_hand_count_of_a_tiny_config():
    lora = flops.LoraShape.preset("all", rank=1)
    # 2 image tokens, 1 text token; per token, a Linear costs 2 in out, its LoRA branch 2 r (in + out).
    forward = (
        2 * 2 * 3 * 2 + 2 * 1 * 5 * 2  # x_embedder, context_embedder
        + 2 * (2 * 2 + 2 * 2)  # timestep embedder (2 -> 2 -> 2)
        + 2 * 2 * 12 * 2 + 2 * 2 * 6  # double modulations (image, text: 2 -> 12), single modulation (2 -> 6)
        # double block, per token: q, k, v, out 8 + 8 each; ff in 32 + 20; ff out 16 + 12; attention 4 x 3^2 x 2
        + 3 * (4 * 16 + 52 + 28) + 4 * 9 * 2
        # single block over 3 tokens: fused in (2 -> 14) 56 + 32, out (6 -> 2) 24 + 16; attention again
        + 3 * (88 + 40) + 4 * 9 * 2
        + 2 * 2 * 4 + 2 * 2 * 2 * 3  # norm_out (2 -> 4) once, proj_out per image token
    )
    # Backward: a frozen Linear's input gradient costs its forward; a LoRA branch 2 r (2 out + in), plus 2 r in
    # for its input's gradient. The first q/k/v read the frozen embedders: no input gradient there.
    backward = (
        3 * (3 * 12 + (8 + 16) + (32 + 40) + (16 + 24))  # double: q/k/v LoRA only, then out, ff in, ff out
        + 2.5 * 72  # attention, fused-kernel backward
        + 3 * ((56 + 64) + (24 + 32)) + 2.5 * 72  # single block
        + 2 * 2 * 2 * 3  # proj_out's input gradient
    )
    got = flops.sample_flops(HAND, lora=lora, image_tokens=2, text_tokens=1)
    assert (got.forward, got.backward, got.recompute) == (forward, backward, 0.0)
    blocks_forward = 3 * (4 * 16 + 52 + 28) + 72 + 3 * (88 + 40) + 72
    assert flops.sample_flops(HAND, lora=lora, image_tokens=2, text_tokens=1, checkpoint_every=1).recompute == \
        blocks_forward
    # Without LoRA nothing needs a gradient: no backward at all.
    assert flops.sample_flops(HAND, lora=flops.NO_LORA, image_tokens=2, text_tokens=1).backward == 0


def _counted(preset: str, *, checkpoint_every: int | None, tread_ratio: float | None, reference: bool,
             zero: bool = False) -> tuple[int, float]:
    """(FlopCounterMode's total, this module's) for one forward + backward of the tiny model with batch 2."""
    from block_tools import tiny_inputs
    from diffusers import Flux2Transformer2DModel
    from flux2_lora_pack.trainer.lora import apply_lora
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = Flux2Transformer2DModel(**TRANSFORMER_CONFIG)
    apply_lora(model, preset=preset, rank=4, alpha=4)
    routes = ()
    if tread_ratio is not None:
        config = tread.TreadConfig.from_dict(
            {"routes": [{"selection_ratio": tread_ratio, "start_layer_idx": 1, "end_layer_idx": -2}]})
        routes = tread.plan_routes(config, num_blocks=TRANSFORMER_CONFIG["num_layers"]
                                   + TRANSFORMER_CONFIG["num_single_layers"])
    blocks.apply_block_forward(model, checkpoint_every=checkpoint_every, routes=routes)
    model.train()
    kwargs = tiny_inputs(batch=2, h=4, w=4, text=7, reference=reference)
    if routes:
        kwargs["tread_generators"] = [torch.Generator().manual_seed(i) for i in range(2)]
    if reference:
        kwargs |= {"num_target_tokens": 16, "reference_timestep": "zero" if zero else "shared"}
    # The math kernel decomposes attention into matmuls the counter sees (the CPU's fused kernel has no formula).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**kwargs, return_dict=False)[0].float().square().mean().backward()
    kept = [(r.start, r.end, tread.kept_count(16, selection_ratio=r.selection_ratio)) for r in routes]
    ours = flops.sample_flops(flops.TransformerShape.from_config(TRANSFORMER_CONFIG),
                              lora=flops.LoraShape.preset(preset, rank=4), image_tokens=16,
                              reference_tokens=4 if reference else 0, text_tokens=7, routes=kept,
                              checkpoint_every=checkpoint_every, zero_reference_timestep=zero, attention_backward=2.0)
    return counter.get_total_flops(), 2 * ours.total


@pytest.mark.parametrize("preset, checkpoint_every, tread_ratio, reference, zero", [
    ("all", None, None, False, False),
    ("mlp", None, None, False, False),  # the first block's attention needs no backward at all
    ("tiny", 2, None, False, False),
    ("attention", 1, 0.5, True, False),  # checkpointing, TREAD and a reference image together
    ("all", None, None, True, True),  # references modulated as at timestep 0
])
def test_count_equals_flop_counter_mode_on_the_tiny_models_forward_and_backward(preset, checkpoint_every,
                                                                                tread_ratio, reference, zero):
    # Both count the same matmuls, so they agree exactly (tolerance: float rounding only).
    measured, counted = _counted(preset, checkpoint_every=checkpoint_every, tread_ratio=tread_ratio,
                                 reference=reference, zero=zero)
    assert counted == pytest.approx(measured, rel=1e-12)


def test_step_averages_samples_by_weight_and_scales_with_batch_accumulation_and_rollouts():
    lora = flops.LoraShape.preset("all", rank=1)
    small = flops.sample_flops(HAND, lora=lora, image_tokens=4, text_tokens=1)
    large = flops.sample_flops(HAND, lora=lora, image_tokens=16, text_tokens=1)
    step = flops.step_flops(HAND, lora=lora, text_tokens=1, batch_size=2, gradient_accumulation=3,
                            samples=[flops.SampleTokens(weight=3, image_tokens=4), flops.SampleTokens(weight=1,
                                                                                               image_tokens=16)],
                            rollout_forwards=1.5)
    expected_train = 6 * (0.75 * small.model + 0.25 * large.model)
    assert step.model == pytest.approx(expected_train, rel=1e-12)
    assert step.no_grad == pytest.approx(3 * 1.5 * (0.75 * small.forward + 0.25 * large.forward), rel=1e-12)
    with pytest.raises(ValueError, match="positive weight"):
        flops.step_flops(HAND, lora=lora, text_tokens=1, batch_size=1, gradient_accumulation=1, samples=[])


def test_shape_from_flux2_dev_config_and_its_step_at_1024_px():
    from flux2_lora_pack.trainer.flavours import SPECS

    shape = flops.TransformerShape.from_config(SPECS["dev"].transformer)
    assert (shape.hidden, shape.num_double, shape.num_single, shape.mlp_hidden) == (6144, 8, 48, 18432)
    one = flops.sample_flops(shape, lora=flops.LoraShape.preset("all", rank=16), image_tokens=4096, text_tokens=512)
    # Each token passes 13 hidden^2 weights per block (a double block's two streams split its 26 between image and
    # text), plus attention; LoRA and the embedders add under 1 %.
    d, tokens = 6144, 4096 + 512
    main = 56 * (2 * 13 * d * d * tokens + 4 * tokens**2 * d)
    assert main < one.forward < 1.01 * main
    assert one.forward < one.backward < 1.3 * one.forward  # input gradients 1x, attention 2.5x


@pytest.mark.parametrize("strategy, sampler, probability, batch, world, reflexflow", [
    ("uniform", "euler", 0.5, 2, 2, None),
    ("biased_late", "heun", 0.3, 3, 1, False),
    ("biased_early", "rk4", 0.8, 1, 3, None),
])
def test_expected_rollout_forwards_match_the_draws(strategy, sampler, probability, batch, world, reflexflow):
    """The expectation against draw_offsets' own draws, replayed as rollout.roll_out runs them on process 0."""
    config = ScheduledSamplingConfig(max_step_offset=5, probability=probability, strategy=strategy, sampler=sampler,
                                     reflexflow=reflexflow)
    draws, total = 3000, 0
    for n in range(draws):
        offsets = config.draw_offsets([torch.Generator().manual_seed(n * 100 + i) for i in range(batch * world)],
                                      step=0)
        steps, rows = max(offsets), max(1, sum(k > 0 for k in offsets[:batch]))
        if steps:
            total += SAMPLER_EVALUATIONS[sampler] * steps * rows + (2 * rows if config.uses_reflexflow else 0)
    expected = config.expected_rollout_forwards(step=0, batch_size=batch, world_size=world)
    assert total / draws == pytest.approx(expected, rel=0.04)  # 3000 draws: a few % of sampling noise
    assert ScheduledSamplingConfig().expected_rollout_forwards(step=0, batch_size=2, world_size=2) == 0
    assert sum(config.offset_distribution()) == pytest.approx(1.0)
