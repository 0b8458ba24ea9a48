"""The training objective: exact formulas, per-sample randomness, guidance modes, caption dropout."""

from __future__ import annotations

import pytest
import torch

from flux2_lora_pack.trainer import flux2
from flux2_lora_pack.trainer.config import GuidanceConfig, ObjectiveConfig
from flux2_lora_pack.trainer.objective import flow_matching_loss, prepare_batch, sample_generators, sample_guidance


def _batch(b: int = 3, h: int = 2, w: int = 3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 128, h, w, generator=g), torch.randn(b, 7, 96, generator=g)


def test_noisy_input_and_target_follow_the_flow_matching_formulas():
    latents, embeds = _batch()
    gens = sample_generators(seed=1, step=5, first_index=0, count=3)
    prepared = prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=ObjectiveConfig(),
                             generators=gens)
    # Recompute with fresh generators in the documented draw order: noise, then sigma.
    again = sample_generators(seed=1, step=5, first_index=0, count=3)
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in again])
    sigmas = torch.cat([flux2.sample_training_sigmas(1, shift=3.0, generator=g) for g in again])
    s = sigmas.view(-1, 1, 1, 1)
    torch.testing.assert_close(prepared.sigmas, sigmas)
    torch.testing.assert_close(prepared.hidden_states, flux2.pack_latents((1 - s) * latents + s * noise))
    torch.testing.assert_close(prepared.target, flux2.pack_latents(noise - latents))
    torch.testing.assert_close(prepared.timestep, sigmas)  # the model scales by 1000 itself
    assert prepared.img_ids.shape == (3, 6, 4) and prepared.txt_ids.shape == (3, 7, 4)


def test_samples_do_not_depend_on_how_the_batch_is_split():
    """Sample i of a global batch gets the same noise whether it is on rank 0 (batch 2) or rank 1 (batch 1)."""
    latents, embeds = _batch(b=2)
    whole = prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=ObjectiveConfig(),
                          generators=sample_generators(seed=3, step=9, first_index=0, count=2))
    second = prepare_batch(latents=latents[1:], prompt_embeds=embeds[1:], empty_embeds=None, spec=ObjectiveConfig(),
                           generators=sample_generators(seed=3, step=9, first_index=1, count=1))
    torch.testing.assert_close(whole.hidden_states[1:], second.hidden_states, rtol=0, atol=0)
    torch.testing.assert_close(whole.sigmas[1:], second.sigmas, rtol=0, atol=0)


def test_guidance_modes():
    gens = sample_generators(seed=0, step=0, first_index=0, count=64)
    constant = sample_guidance(GuidanceConfig(mode="constant", value=3.5), gens)
    assert torch.equal(constant, torch.full((64,), 3.5))
    ranged = sample_guidance(GuidanceConfig(mode="random-range", minimum=1.0, maximum=4.0),
                             sample_generators(seed=0, step=0, first_index=0, count=64))
    assert ranged.min() >= 1.0 and ranged.max() <= 4.0
    assert len(set(ranged.tolist())) == 64, "each sample must get its own guidance value"
    with pytest.raises(ValueError, match="flux_guidance_mode"):
        sample_guidance(GuidanceConfig(mode="cfg"), gens)


def test_random_range_guidance_reaches_the_model(tiny_model_dir):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    seen = []
    model.time_guidance_embed.register_forward_hook(lambda mod, args, out: seen.append(args[1].clone()))
    latents = torch.randn(4, 128, 2, 2)
    embeds = torch.randn(4, 8, 96)
    spec = ObjectiveConfig(guidance=GuidanceConfig(mode="random-range", minimum=1.0, maximum=5.0))
    prepared = prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=spec,
                             generators=sample_generators(seed=0, step=0, first_index=0, count=4))
    with torch.no_grad():
        flow_matching_loss(model, prepared, device=torch.device("cpu"), dtype=torch.float32)
    # The transformer multiplies guidance by 1000 before its embedding, as it does the timestep.
    torch.testing.assert_close(seen[0], prepared.guidance * 1000)
    assert len(set(seen[0].tolist())) == 4


def test_caption_dropout_uses_the_empty_prompt_encoding():
    latents, embeds = _batch(b=8)
    empty = torch.full((1, 7, 96), 7.0)
    spec = ObjectiveConfig(caption_dropout_probability=0.5)
    gens = sample_generators(seed=2, step=0, first_index=0, count=8)
    prepared = prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=empty, spec=spec, generators=gens)
    dropped = [bool((prepared.encoder_hidden_states[i] == 7.0).all()) for i in range(8)]
    kept = [bool(torch.equal(prepared.encoder_hidden_states[i], embeds[i])) for i in range(8)]
    assert all(d != k for d, k in zip(dropped, kept))
    assert 0 < sum(dropped) < 8
    with pytest.raises(ValueError, match="empty-prompt"):
        prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=spec, generators=gens)


def test_loss_ignores_reference_token_outputs(tiny_model_dir):
    from diffusers import Flux2Transformer2DModel

    model = Flux2Transformer2DModel.from_pretrained(tiny_model_dir / "transformer")
    latents, embeds = torch.randn(1, 128, 2, 2), torch.randn(1, 8, 96)
    reference = torch.randn(1, 128, 3, 3)
    gens = sample_generators(seed=0, step=0, first_index=0, count=1)
    prepared = prepare_batch(latents=latents, prompt_embeds=embeds, empty_embeds=None, spec=ObjectiveConfig(),
                             generators=gens, reference_latents=[reference])
    assert prepared.hidden_states.shape[1] == 4 + 9 and prepared.num_target_tokens == 4
    assert prepared.img_ids[0, 4:, 0].unique().tolist() == [10]  # first reference image at t = 10
    with torch.no_grad():
        pred = model(hidden_states=prepared.hidden_states, encoder_hidden_states=prepared.encoder_hidden_states,
                     timestep=prepared.timestep, img_ids=prepared.img_ids, txt_ids=prepared.txt_ids,
                     guidance=prepared.guidance, return_dict=False)[0]
        loss = flow_matching_loss(model, prepared, device=torch.device("cpu"), dtype=torch.float32)
    torch.testing.assert_close(loss, torch.nn.functional.mse_loss(pred[:, :4], prepared.target))
