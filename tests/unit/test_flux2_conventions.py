"""trainer/flux2.py against diffusers' own Flux2Pipeline and FlowMatchEulerDiscreteScheduler (tiny model, fp32).

Tolerances: atol 1e-6, rtol 0 for floats (the implementations are bit-identical here; the tolerance only
absorbs a possible last-bit difference between kernels), exact equality for integer ids and token ids.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from flux2_lora_pack.trainer import flux2

ATOL = dict(atol=1e-6, rtol=0.0)

PROMPTS = [
    "a red cube on a blue floor",
    "",  # the empty prompt (caption dropout uses its real encoding)
    "a photo of a yellow cat sitting on a wooden table, " * 60,  # far beyond 512 tokens
    "portrait [IMG] of a woman",  # "[IMG]" is removed, as diffusers does
]


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return tiny_pipeline


# ---------------------------------------------------------------------------------------------------- text


def test_system_message_and_messages_match_diffusers():
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    assert flux2.SYSTEM_MESSAGE == SYSTEM_MESSAGE
    assert flux2.format_messages(PROMPTS) == format_input(prompts=PROMPTS, system_message=SYSTEM_MESSAGE)
    assert flux2.format_messages(["x"], system_message="sys")[0][0]["content"][0]["text"] == "sys"


def test_tokenize_prompts_matches_diffusers_and_flags_truncation(pipe):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    ids, mask, truncated = flux2.tokenize_prompts(pipe.tokenizer, PROMPTS)
    # The exact call Flux2Pipeline._get_mistral_3_small_prompt_embeds makes.
    expected = pipe.tokenizer.apply_chat_template(
        format_input(prompts=PROMPTS, system_message=pipe.system_message),
        add_generation_prompt=False,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        padding="max_length",
        truncation=True,
        max_length=512,
    )
    assert ids.shape == mask.shape == (len(PROMPTS), 512)
    assert torch.equal(ids, expected["input_ids"])
    assert torch.equal(mask, expected["attention_mask"])
    assert truncated == [False, False, True, False]
    lengths = mask.sum(dim=1).tolist()
    assert lengths[2] == 512 and all(n < 512 for i, n in enumerate(lengths) if i != 2)
    # Left padding on this tokenizer, as on FLUX.2-dev's: the real tokens end the row.
    assert mask[0, -1] == 1 and mask[0, 0] == 0
    # The empty prompt still holds the template: bos, system block, [INST][/INST].
    assert lengths[1] > 4
    # A prompt of exactly max_length tokens is not truncated; one more token is.
    exact = lengths[0]
    assert flux2.tokenize_prompts(pipe.tokenizer, [PROMPTS[0]], max_length=exact)[2] == [False]
    assert flux2.tokenize_prompts(pipe.tokenizer, [PROMPTS[0]], max_length=exact - 1)[2] == [True]


def test_tokenize_prompts_rejects_a_bare_string(pipe):
    with pytest.raises(ValueError, match="list of strings"):
        flux2.tokenize_prompts(pipe.tokenizer, "a cat")


def test_encode_prompts_matches_pipeline(pipe):
    ours = flux2.encode_prompts(pipe.text_encoder, pipe.tokenizer, PROMPTS)
    assert ours.shape == (len(PROMPTS), 512, 3 * 32)
    assert not ours.requires_grad
    expected = pipe._get_mistral_3_small_prompt_embeds(pipe.text_encoder, pipe.tokenizer, PROMPTS)
    assert_close(ours, expected.detach(), **ATOL)
    embeds, text_ids = pipe.encode_prompt(prompt=PROMPTS, device=torch.device("cpu"))
    assert_close(ours, embeds.detach(), **ATOL)
    assert torch.equal(flux2.text_position_ids(len(PROMPTS), 512), text_ids)
    # Layer order per token: features [k*H:(k+1)*H] are hidden state TEXT_HIDDEN_LAYERS[k].
    ids, mask, _ = flux2.tokenize_prompts(pipe.tokenizer, PROMPTS[:1])
    hidden = pipe.text_encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert_close(ours[:1, :, 32:64], hidden[20].detach(), **ATOL)


def test_encode_prompts_device_dtype_and_layer_check(pipe):
    half = flux2.encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a dog"], dtype=torch.float16, device="cpu")
    assert half.dtype == torch.float16 and half.device.type == "cpu"
    with pytest.raises(ValueError, match="40"):
        flux2.encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a dog"], hidden_layers=(10, 20, 40))


# ---------------------------------------------------------------------------------------------- positions


def test_position_ids_match_pipeline():
    from diffusers import Flux2Pipeline

    assert torch.equal(flux2.text_position_ids(2, 7), Flux2Pipeline._prepare_text_ids(torch.zeros(2, 7, 96)))
    ids = flux2.image_position_ids(2, 3, 5)
    assert ids.dtype == torch.int64 and ids.shape == (2, 15, 4)
    assert torch.equal(ids, Flux2Pipeline._prepare_latent_ids(torch.zeros(2, 128, 3, 5)))
    assert ids[0, 6].tolist() == [0, 1, 1, 0]  # row-major: token 6 of a 5-wide grid is (y=1, x=1)
    assert flux2.image_position_ids(1, 2, 2, time_index=7)[0, :, 0].tolist() == [7, 7, 7, 7]

    shapes = [(2, 3), (4, 1), (1, 2)]
    expected = Flux2Pipeline._prepare_image_ids([torch.zeros(1, 128, h, w) for h, w in shapes]).repeat(2, 1, 1)
    refs = flux2.reference_position_ids(shapes, 2)
    assert refs.shape == (2, 6 + 4 + 2, 4)
    assert torch.equal(refs, expected)
    assert sorted(set(refs[0, :, 0].tolist())) == [10, 20, 30]


# ------------------------------------------------------------------------------------------------ latents


def test_patchify_and_packing_match_pipeline():
    from diffusers import Flux2Pipeline

    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(2, 32, 4, 6, generator=gen)
    patched = flux2.patchify_latents(raw)
    assert patched.shape == (2, 128, 2, 3)
    assert torch.equal(patched, Flux2Pipeline._patchify_latents(raw))
    assert torch.equal(flux2.unpatchify_latents(patched), Flux2Pipeline._unpatchify_latents(patched))
    assert torch.equal(flux2.unpatchify_latents(patched), raw)

    packed = flux2.pack_latents(patched)
    assert packed.shape == (2, 6, 128)
    assert torch.equal(packed, Flux2Pipeline._pack_latents(patched))
    ids = Flux2Pipeline._prepare_latent_ids(patched)
    unpacked = Flux2Pipeline._unpack_latents_with_ids(packed, ids)
    assert torch.equal(flux2.unpack_latents(packed, height=2, width=3), unpacked)
    with pytest.raises(ValueError, match="3x3"):
        flux2.unpack_latents(packed, height=3, width=3)
    with pytest.raises(ValueError, match="even"):
        flux2.patchify_latents(torch.zeros(1, 32, 3, 4))


def test_latent_statistics_and_normalisation(pipe):
    mean, std = flux2.latent_statistics(pipe.vae)
    assert mean.shape == std.shape == (128,)
    assert pipe.vae.config.batch_norm_eps == 1e-4
    assert_close(std, torch.sqrt(pipe.vae.bn.running_var + 1e-4), **ATOL)
    assert mean.abs().max() > 0  # the tiny VAE has non-trivial statistics, so the test can see them
    x = torch.randn(2, 128, 2, 3, generator=torch.Generator().manual_seed(1))
    assert_close(flux2.denormalize_latents(flux2.normalize_latents(x, vae=pipe.vae), vae=pipe.vae), x, **ATOL)


def _images(batch: int, height: int, width: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_images_matches_pipeline(pipe):
    images = _images(2, 32, 48, seed=2)
    ours = flux2.encode_images(pipe.vae, images)
    assert ours.shape == (2, 128, 32 // 16, 48 // 16)
    with torch.no_grad():
        expected = pipe._encode_vae_image(images, generator=None)
    assert_close(ours.detach(), expected, **ATOL)
    with pytest.raises(ValueError, match="multiple of 16"):
        flux2.encode_images(pipe.vae, _images(1, 40, 48, seed=3))


def test_decode_latents_matches_pipeline_tail(pipe):
    from diffusers import Flux2Pipeline

    latents = torch.randn(2, 128, 2, 3, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = flux2.decode_latents(pipe.vae, latents)
        # The tail of Flux2Pipeline.__call__: unpack with ids, batch-norm denormalise, unpatchify, decode.
        packed = Flux2Pipeline._pack_latents(latents)
        x = Flux2Pipeline._unpack_latents_with_ids(packed, Flux2Pipeline._prepare_latent_ids(latents))
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        raw = pipe.vae.decode(Flux2Pipeline._unpatchify_latents(x * std + mean), return_dict=False)[0]
    assert ours.shape == (2, 3, 32, 48)
    assert_close(ours, raw.clamp(-1, 1), **ATOL)
    # Not vacuous: some pixels are inside (-1, 1), and the clamp equals the pipeline's postprocess.
    assert ((raw > -1) & (raw < 1)).float().mean() > 0.2
    assert_close(ours * 0.5 + 0.5, pipe.image_processor.postprocess(raw, output_type="pt"), **ATOL)


# -------------------------------------------------------------------------------------- training timesteps


def test_shift_sigmas_equals_scheduler_static_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    shifted = FlowMatchEulerDiscreteScheduler(shift=3.0)
    plain = FlowMatchEulerDiscreteScheduler(shift=1.0)
    assert_close(flux2.shift_sigmas(plain.sigmas, shift=3.0), shifted.sigmas, **ATOL)
    # Sigmas handed to set_timesteps go through the same static shift.
    given = np.linspace(1.0, 0.05, 20)
    shifted.set_timesteps(sigmas=given)
    assert_close(flux2.shift_sigmas(torch.from_numpy(given).float(), shift=3.0), shifted.sigmas[:-1], **ATOL)
    assert torch.equal(flux2.shift_sigmas(plain.sigmas, shift=1.0), plain.sigmas)
    with pytest.raises(ValueError, match="shift"):
        flux2.shift_sigmas(plain.sigmas, shift=0.0)


def test_training_sigma_distribution():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    n = 20_000
    plain = flux2.sample_training_sigmas(n, shift=1.0, generator=torch.Generator().manual_seed(0))
    # Logit-normal (0, 1): the same draw as diffusers' training scripts with the same generator.
    expected = compute_density_for_timestep_sampling(
        "logit_normal", n, logit_mean=0.0, logit_std=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert_close(plain, expected, **ATOL)
    assert plain.dtype == torch.float32 and plain.shape == (n,)
    assert 0 < plain.min() and plain.max() < 1
    assert abs(plain.median().item() - 0.5) < 0.01

    shifted = flux2.sample_training_sigmas(n, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert_close(shifted, flux2.shift_sigmas(plain, shift=3.0), **ATOL)
    # shift 3 maps the median 0.5 to 3 * 0.5 / (1 + 2 * 0.5) = 0.75 and moves mass toward noise.
    assert abs(shifted.median().item() - 0.75) < 0.01
    assert (shifted > 0.5).float().mean() > 0.7
    assert (shifted >= plain).all()


def test_resolution_shift_counts_128_channel_tokens(pipe):
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for n in (1, 6, 256, 1024, 4096, 9000):
        assert resolution_close(flux2.resolution_shift(n), math.exp(calculate_shift(n)))
    # A 1024x1024 image is (1024/16)^2 = 4096 tokens -> the maximum shift exp(1.15); 256x256 -> exp(0.5).
    assert resolution_close(flux2.resolution_shift((1024 // 16) * (1024 // 16)), math.exp(1.15))
    assert resolution_close(flux2.resolution_shift((256 // 16) * (256 // 16)), math.exp(0.5))
    # The token count is h * w of the encoded (B, 128, h, w) latents, i.e. packed tokens, not 32-channel pixels.
    latents = flux2.encode_images(pipe.vae, _images(1, 32, 48, seed=5))
    assert flux2.pack_latents(latents).shape[1] == latents.shape[2] * latents.shape[3] == (32 // 16) * (48 // 16)


def resolution_close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-12 * max(1.0, abs(b))


def test_noisy_latents_match_scheduler_scale_noise():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(num_inference_steps=10)
    gen = torch.Generator().manual_seed(6)
    x0 = torch.randn(2, 128, 2, 3, generator=gen)
    noise = torch.randn(2, 128, 2, 3, generator=gen)
    picks = torch.tensor([1, 7])  # a different sigma per sample
    expected = scheduler.scale_noise(x0, scheduler.timesteps[picks], noise)
    x_t = flux2.noisy_latents(x0, noise, scheduler.sigmas[picks])
    assert_close(x_t, expected, **ATOL)
    # One Euler step from sigma to 0 along the target velocity lands on x0: target is d x_t / d sigma.
    target = flux2.flow_target(x0, noise)
    assert_close(x_t - scheduler.sigmas[picks].view(-1, 1, 1, 1) * target, x0, atol=1e-5, rtol=0.0)


# -------------------------------------------------------------------------------------- sampling timesteps


def test_empirical_mu_matches_official():
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    for seq in (1, 6, 256, 1024, 4096, 4300, 4301, 16384):
        for steps in (1, 4, 28, 50, 200):
            assert flux2.empirical_mu(seq, steps) == pytest.approx(compute_empirical_mu(seq, steps), rel=1e-12)


def test_sampling_sigmas_match_scheduler(tiny_model_dir):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_model_dir / "scheduler")
    # The FLUX.2-dev scheduler config: without dynamic exponential shifting this test would prove nothing.
    assert scheduler.config.use_dynamic_shifting and scheduler.config.time_shift_type == "exponential"
    for steps in (1, 2, 4, 28, 50):
        for seq in (6, 256, 1024, 4096, 4300, 4301, 6000, 16384):
            # Exactly what Flux2Pipeline.__call__ passes.
            scheduler.set_timesteps(
                sigmas=np.linspace(1.0, 1 / steps, steps), mu=compute_empirical_mu(image_seq_len=seq, num_steps=steps)
            )
            ours = flux2.sampling_sigmas(steps, image_seq_len=seq)
            assert ours.dtype == torch.float32 and ours.shape == (steps + 1,)
            assert ours[-1] == 0 and ours[0] == 1
            assert_close(ours, scheduler.sigmas, **ATOL)
    with pytest.raises(ValueError, match="num_steps"):
        flux2.sampling_sigmas(0, image_seq_len=16)
